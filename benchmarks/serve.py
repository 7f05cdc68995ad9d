"""Serving benchmark on this machine, in one run:

1. Engine throughput (images/s at batch 16 and 1, preprocessed real photos, so decoding is
   excluded): the model in PyTorch eager, exported to ONNX fp32, int8 dynamic and int8 static
   (run by ONNX Runtime), and the original design's ResNet-50 (same heads and image size,
   random weights - weights do not change the speed) in PyTorch eager.
2. The HTTP service: ``beautytag serve`` in a subprocess on 127.0.0.1, single-photo multipart
   requests of real photos at concurrency 1, 8 and 32 (latency percentiles, requests/s,
   statuses, average micro-batch from /metrics), then overload at concurrency 256 (statuses,
   the server's resident memory).

Writes benchmarks/results/serve.json and serve.md (serve-quick.* with --quick). Usage:

    python benchmarks/serve.py                 # 10 s per load level, both served models
    python benchmarks/serve.py --quick         # smoke run: short levels, only the faster model
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import itertools
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from benchlib import datasets_dir, git_revision, no_datasets, throughput

from beautytag.checkpoint import load_checkpoint, resolve_model, save_checkpoint
from beautytag.config import Config, config_from_dict
from beautytag.export import quantize_onnx
from beautytag.nn.net import BeautyTagNet
from beautytag.runtime.engine import Engine
from beautytag.runtime.onnx import export_model_onnx

ROOT = Path(__file__).resolve().parents[1]
DATA = datasets_dir()
RESULTS = ROOT / "benchmarks" / "results"
PHOTOS_PER_SOURCE = 400
LEVELS = (1, 8, 32)
OVERLOAD = 256
TARGET_SPEEDUP = 3.0  # ONNX Runtime fp32 vs ResNet-50 eager
TARGET_P99_MS = 100.0  # at concurrency 8
RSS_GROWTH_LIMIT_MB = 256.0  # overload peak minus the resident memory before it
MB = 1024 * 1024
PHOTO_SETS = {
    "catalogue": "Personal Care catalogue photos, 60 x 80 JPEGs",
    "mixed": "catalogue photos alternating with beauty-shades photos of 600-4700 px, mostly "
    "progressive JPEGs plus PNGs and WebPs",
}


# ---------------------------------------------------------------- machine and photos


def machine() -> dict[str, Any]:
    """What the numbers were measured on (load average: other jobs make them noisy)."""
    import onnxruntime

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout)
    except (OSError, ValueError):
        nproc = len(os.sched_getaffinity(0))
    return {
        "nproc": nproc,
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
    }


def photo_sets() -> dict[str, list[Path]]:
    """The photos clients send: ``catalogue`` (Personal Care catalogue photos, 60 x 80 JPEGs)
    and ``mixed`` (those interleaved with beauty-shades photos: 600-4700 px, mostly
    progressive JPEGs, some PNGs and WebPs)."""
    rows = csv.DictReader((DATA / "fashion-products-small" / "labels.csv").open())
    catalogue = [
        DATA / "fashion-products-small" / r["file_name"]
        for r in rows
        if r["masterCategory"] == "Personal Care"
    ][:PHOTOS_PER_SOURCE]
    shades = sorted((DATA / "beauty-shades" / "images").iterdir())[:PHOTOS_PER_SOURCE]
    mixed = [p for pair in itertools.zip_longest(catalogue, shades) for p in pair if p]
    return {
        "catalogue": [p for p in catalogue if p.is_file()],
        "mixed": [p for p in mixed if p.is_file()],
    }


# ---------------------------------------------------------------- 1. engine throughput


def resnet50_checkpoint(cfg: Config, out: Path) -> Path:
    """The model's config with a ResNet-50 backbone (random init), saved as a checkpoint so it
    runs through the same Engine code path."""
    raw = cfg.to_dict()
    raw["model"] |= {"backbone": "resnet50", "weights": "none"}
    cfg = config_from_dict(raw)
    save_checkpoint(out, BeautyTagNet(cfg, pretrained=False).eval(), cfg)
    return out


def engine_cases(model: Path, tmp: Path, photos: list[Path], quick: bool) -> dict[str, Path]:
    """name -> model file: the checkpoint, its ONNX exports and the ResNet-50 reference."""
    net, cfg, _ = load_checkpoint(model)
    onnx = export_model_onnx(net, cfg, tmp / "model.onnx")
    dynamic_pad = export_model_onnx(
        net, cfg, tmp / "model-dynamic-padding.onnx", fixed_padding=False
    )
    calibration = photos[: 16 if quick else 64]
    return {
        "pytorch_eager": model,
        "onnx_fp32": onnx,
        "onnx_fp32_dynamic_padding": dynamic_pad,
        "onnx_int8_dynamic": quantize_onnx(onnx, tmp / "model-int8-dynamic.onnx", "dynamic"),
        "onnx_int8_static": quantize_onnx(
            onnx, tmp / "model-int8-static.onnx", "static", calibration
        ),
        "resnet50_pytorch_eager": resnet50_checkpoint(cfg, tmp / "resnet50.pt"),
    }


def decode_times(engine: Engine, paths: list[Path]) -> dict[str, float]:
    """Milliseconds to decode and preprocess each photo (one thread), as the service does."""
    times = []
    for p in paths:
        data = p.read_bytes()
        t0 = time.perf_counter()
        engine.load(data, p.name)
        times.append(1000 * (time.perf_counter() - t0))
    return {
        "mean": round(float(np.mean(times)), 1),
        "p50": round(float(np.percentile(times, 50)), 1),
        "p99": round(float(np.percentile(times, 99)), 1),
        "max": round(float(np.max(times)), 1),
    }


def bench_engines(cases: dict[str, Path], photos: list[Path], budget_s: float) -> dict:
    """Throughput of every case at batch 16 and 1, and ratios to PyTorch eager."""
    results: dict[str, Any] = {}
    for name, path in cases.items():
        engine = Engine(path, backend="torch" if path.suffix == ".pt" else "auto")
        xs = torch.stack([engine.load(p)[1] for p in photos[:16]])
        results[name] = {
            "runtime": engine.backend.name,
            "file_mb": round(path.stat().st_size / MB, 1),
        }
        for batch in (16, 1):
            results[name][f"batch{batch}"] = throughput(engine.backend, xs[:batch], budget_s)
            print(f"{name} batch {batch}: {results[name][f'batch{batch}']}", flush=True)
        del engine
        gc.collect()
    for r in results.values():
        for b in ("batch16", "batch1"):
            base = results["pytorch_eager"][b]["images_per_s"]
            r[b]["vs_pytorch_eager"] = round(r[b]["images_per_s"] / base, 2)
    return results


# ---------------------------------------------------------------- 2. the HTTP service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak resident) of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name with labels: value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def server_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """From two /metrics scrapes: micro-batching (model calls, images per call, model time)
    and the server's own /v1/predict latency (from the app receiving the request to its
    answer; excludes the client and the wait before the app runs), p99 as a bucket bound."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    calls = delta.get("beautytag_batch_size_count", 0.0)
    requests = delta.get('beautytag_request_duration_seconds_count{endpoint="/v1/predict"}', 0.0)
    latency = delta.get('beautytag_request_duration_seconds_sum{endpoint="/v1/predict"}', 0.0)
    prefix = 'beautytag_request_duration_seconds_bucket{endpoint="/v1/predict",le="'
    bounds = sorted(
        (float(k[len(prefix) : -2]), v) for k, v in delta.items() if k.startswith(prefix)
    )
    p99 = next((b for b, n in bounds if n >= 0.99 * requests), None) if requests else None
    return {
        "model_calls": int(calls),
        "avg_batch_size": round(delta.get("beautytag_batch_size_sum", 0.0) / calls, 2)
        if calls
        else None,
        "batch_size_cumulative_buckets": {
            k.split('le="')[1].rstrip('"}'): int(v)
            for k, v in delta.items()
            if k.startswith("beautytag_batch_size_bucket")
        },
        "avg_model_ms_per_call": round(
            1000 * delta.get("beautytag_inference_seconds_sum", 0.0) / calls, 1
        )
        if calls
        else None,
        "server_mean_ms": round(1000 * latency / requests, 1) if requests else None,
        "server_p99_ms_at_most": None
        if p99 is None
        else (round(1000 * p99) if p99 < float("inf") else f"over {1000 * bounds[-2][0]:.0f}"),
    }


class Server:
    """``beautytag serve`` in a subprocess on a free local port (log in a file)."""

    def __init__(self, model: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "beautytag.cli",
            "serve",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend",
            "torch" if model.suffix == ".pt" else "auto",
        ]
        with log.open("wb") as f:  # a file, not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).raise_for_status().json()
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError(f"server not ready in {timeout_s} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


class Connection:
    """One keep-alive HTTP/1.1 connection that posts prebuilt multipart requests and reads
    the status and a Content-Length body: far less CPU per request than httpx (about 3 ms
    here, a third of the server's own cost, on the same two CPUs)."""

    BOUNDARY = "beautytag-load"

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    @classmethod
    def request(cls, host: str, port: int, path: str, name: str, data: bytes) -> bytes:
        """The bytes of a POST of ``data`` as multipart field ``file``."""
        body = (
            (
                f'--{cls.BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{name}"\r\nContent-Type: image/jpeg\r\n\r\n'
            ).encode()
            + data
            + f"\r\n--{cls.BOUNDARY}--\r\n".encode()
        )
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={cls.BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def send(self, request: bytes) -> str:
        """Send one request; its status code, or the error's name (the connection is then
        dropped and reopened by the next request)."""
        try:
            if self.streams is None:
                self.streams = await asyncio.open_connection(self.host, self.port)
            reader, writer = self.streams
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(ln.lower().split(": ", 1) for ln in lines[1:] if ": " in ln)
            await reader.readexactly(int(headers.get("content-length", 0)))
            if headers.get("connection") == "close":
                self.close()
            return lines[0].split(" ")[1]
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as e:
            self.close()
            return type(e).__name__

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def load_level(
    client: httpx.AsyncClient,
    server: Server,
    photos: list[tuple[str, bytes]],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> dict[str, Any]:
    """``concurrency`` closed-loop clients posting one photo each, back to back, for warm-up +
    duration. Latencies and statuses: requests sent inside the measured window (all are
    awaited); throughput: answers received inside it, whenever sent. The server's memory is
    sampled every 0.1 s until the last answer; /metrics is scraped at the window's edges."""
    t0 = time.perf_counter()
    start, end = t0 + warmup_s, t0 + warmup_s + duration_s
    counter = itertools.count()
    records: list[tuple[float, float, str]] = []  # (sent, answered, status)
    rss: list[float] = []
    done = asyncio.Event()
    requests = [Connection.request("127.0.0.1", server.port, "/v1/predict", *p) for p in photos]
    cpu: dict[str, float] = {}

    async def worker() -> None:
        conn = Connection("127.0.0.1", server.port)
        while (sent := time.perf_counter()) < end:
            if sent >= start and not cpu:  # the CPU both sides use inside the window
                cpu.update(client=time.process_time(), server=cpu_seconds(server.proc.pid))
            status = await conn.send(requests[next(counter) % len(requests)])
            records.append((sent, time.perf_counter(), status))
        conn.close()

    async def scrape_at(when: float) -> dict[str, float]:
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        return parse_metrics((await client.get(f"{server.url}/metrics")).text)

    async def sample_memory() -> None:
        while not done.is_set():
            rss.append(memory_mb(server.proc.pid)["VmRSS"])
            await asyncio.sleep(0.1)

    scrapes = [asyncio.create_task(scrape_at(start)), asyncio.create_task(scrape_at(end))]
    sampler = asyncio.create_task(sample_memory())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    client_cpu = time.process_time() - cpu.get("client", time.process_time())
    server_cpu = cpu_seconds(server.proc.pid) - cpu.get("server", cpu_seconds(server.proc.pid))
    done.set()
    await sampler
    before, after = await scrapes[0], await scrapes[1]
    sent_in = [(a, b, s) for a, b, s in records if a >= start]
    ok = [b - a for a, b, s in sent_in if s == "200"]
    pct = [round(float(v), 1) for v in np.percentile(ok, [50, 95, 99]) * 1000] if ok else [None] * 3
    answered = [s for _, b, s in records if start <= b <= end]
    return {
        "concurrency": concurrency,
        "seconds": duration_s,
        "requests": len(sent_in),
        "requests_per_s": round(len(answered) / duration_s, 2),
        "ok_per_s": round(answered.count("200") / duration_s, 2),
        "statuses": dict(Counter(s for _, _, s in sent_in)),
        "warmup_statuses": dict(Counter(s for a, _, s in records if a < start)),
        "latency_ms_200": dict(zip(("p50", "p95", "p99"), pct, strict=True)),
        "server_rss_mb_peak": max(rss) if rss else None,
        "server_rss_mb_last": rss[-1] if rss else None,
        # CPU per request sent in the window (the load generator shares the CPUs)
        "client_cpu_ms_per_request": round(1000 * client_cpu / max(1, len(sent_in)), 1),
        "server_cpu_ms_per_request": round(1000 * server_cpu / max(1, len(sent_in)), 1),
    } | server_stats(before, after)


async def bench_service(
    server: Server, photos: list[tuple[str, bytes]], duration_s: float, warmup_s: float
) -> dict[str, Any]:
    """The load levels, then the overload, against one running server."""
    gc.collect()
    gc.freeze()  # the load generator's own full collections would stall its clocks
    result: dict[str, Any] = {"memory_mb_idle": memory_mb(server.proc.pid), "levels": []}
    async with httpx.AsyncClient(timeout=60) as client:  # for /metrics; the load: Connection
        for c in LEVELS:
            level = await load_level(client, server, photos, c, warmup_s, duration_s)
            result["levels"].append(level)
            print(json.dumps(level), flush=True)
        before = memory_mb(server.proc.pid)
        over = await load_level(client, server, photos, OVERLOAD, warmup_s, duration_s)
        await asyncio.sleep(1.0)
        after = memory_mb(server.proc.pid)
        if after["VmHWM"] > before["VmHWM"]:  # the exact peak, set during the overload
            over["server_rss_mb_peak"] = max(over["server_rss_mb_peak"], after["VmHWM"])
        over["server_rss_mb_before"] = before["VmRSS"]
        over["server_rss_mb_after_1s"] = after["VmRSS"]
        over["server_vmhwm_mb"] = after["VmHWM"]
        print(json.dumps(over), flush=True)
    c8 = next(lv for lv in result["levels"] if lv["concurrency"] == 8)
    growth = over["server_rss_mb_peak"] - before["VmRSS"]
    # the first burst (in the warm-up) counts too
    only_200_503 = set(over["statuses"]) | set(over["warmup_statuses"]) <= {"200", "503"}
    result["overload"] = over | {
        "only_200_and_503": only_200_503,
        "rss_growth_mb": round(growth, 1),
        "memory_bounded": growth < RSS_GROWTH_LIMIT_MB,
    }
    result["p99_ms_at_8"] = c8["latency_ms_200"]["p99"]
    p99 = result["p99_ms_at_8"]
    all_200 = set(c8["statuses"]) | set(c8["warmup_statuses"]) == {"200"}
    result["p99_target_met"] = p99 is not None and p99 < TARGET_P99_MS and all_200
    result["overload_target_met"] = bool(only_200_503 and growth < RSS_GROWTH_LIMIT_MB)
    return result


# ---------------------------------------------------------------- report


def write_markdown(r: dict[str, Any], path: Path) -> None:
    m = r["machine"]
    lines = [
        "# beautytag serving benchmark",
        "",
        f"Command: `{r['command']}` (revision {r.get('revision', 'not recorded')}). "
        f"Machine: {m['cpu']}, nproc {m['nproc']}, torch "
        f"{m['torch']} ({m['torch_threads']} threads), onnxruntime {m['onnxruntime']}, "
        f"OMP_WAIT_POLICY {m['OMP_WAIT_POLICY']}, load average {m['load_average_at_start']} at "
        f"start and {m['load_average_at_end']} at the end.",
        "",
        *([f"**{r['warning']}**", ""] if r.get("warning") else []),
        "## Targets",
        "",
        "| target | measured | pass |",
        "| --- | --- | --- |",
    ]
    for t in r["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['pass'] else 'NO'} |")
    lines += [
        "",
        "## Engine throughput (preprocessed tensors; model + output activation, no decoding)",
        "",
        f"{r['engine_seconds_per_case']} s per case after 2 warm-up calls. The ResNet-50 row is "
        "the original design's backbone with the same heads and image size and random weights "
        "(weights do not change the speed). onnx_fp32_dynamic_padding is the same export with "
        "timm's padding computed at run time (as before commit 3a0670a): ONNX Runtime cannot "
        "fold those pads into the convolutions.",
        "",
        "| model | runtime | MB | batch 16 img/s | ms/call | vs eager | batch 1 img/s | ms/call "
        "| vs eager |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, e in r["engine"].items():
        b16, b1 = e["batch16"], e["batch1"]
        lines.append(
            f"| {name} | {e['runtime']} | {e['file_mb']} | {b16['images_per_s']} | "
            f"{b16['ms_per_call_median']} | {b16['vs_pytorch_eager']}x | {b1['images_per_s']} | "
            f"{b1['ms_per_call_median']} | {b1['vs_pytorch_eager']}x |"
        )
    lines += [
        "",
        "## Decoding (what each request costs before the model)",
        "",
        "Milliseconds per photo to decode, letterbox and normalise, one thread, as the service "
        "does (JPEGs decoded at reduced DCT scale when much larger than the model input).",
        "",
        "| photos | n | mean ms | p50 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k, d in r["decode_ms"].items():
        lines.append(
            f"| {k} ({PHOTO_SETS[k]}) | {r['photos'][k]} | {d['mean']} | {d['p50']} | "
            f"{d['p99']} | {d['max']} |"
        )
    for name, s in r["service"].items():
        lines += [
            "",
            f"## Service: {name} (`beautytag serve --model {s['file']}`, {s['backend']})",
            "",
            f"Single-photo multipart requests of real photos ({s['photos']} set: "
            f"{PHOTO_SETS[s['photos']]}) from 127.0.0.1 by a minimal keep-alive HTTP/1.1 client, "
            f"{r['load_seconds']} s per level after {r['warmup_seconds']} s warm-up; the load "
            "generator runs on the same CPUs. Closed loop: each client sends its next request "
            "when the previous answer arrives, so latency ~ concurrency / throughput (p99 < "
            f"{TARGET_P99_MS:.0f} ms at 8 needs about {8000 / TARGET_P99_MS:.0f} answers/s). "
            "Latency and statuses of requests sent in the window, requests/s of answers "
            "received in it; avg batch from /metrics (images per model call); CPU ms per "
            "request of the server process and of the load generator.",
            "",
            "| concurrency | requests/s | 200/s | p50 ms | p95 ms | p99 ms | statuses "
            "| server mean ms | server p99 <= ms | avg batch | model ms/call "
            "| server CPU ms/req | client CPU ms/req | server RSS peak MB |",
            "|" + " --- |" * 14,
        ]
        for lv in [*s["levels"], s["overload"]]:
            lat = lv["latency_ms_200"]
            lines.append(
                f"| {lv['concurrency']} | {lv['requests_per_s']} | {lv['ok_per_s']} | "
                f"{lat['p50']} | {lat['p95']} | {lat['p99']} | "
                f"{', '.join(f'{k}: {v}' for k, v in sorted(lv['statuses'].items()))} | "
                f"{lv['server_mean_ms']} | {lv['server_p99_ms_at_most']} | "
                f"{lv['avg_batch_size']} | {lv['avg_model_ms_per_call']} | "
                f"{lv.get('server_cpu_ms_per_request')} | {lv.get('client_cpu_ms_per_request')} | "
                f"{lv['server_rss_mb_peak']} |"
            )
        o = s["overload"]
        lines += [
            "",
            f"Overload ({OVERLOAD} clients): server RSS {o['server_rss_mb_before']} MB before, "
            f"peak {o['server_rss_mb_peak']} MB (growth {o['rss_growth_mb']} MB, limit "
            f"{RSS_GROWTH_LIMIT_MB:.0f}), {o['server_rss_mb_after_1s']} MB 1 s after; "
            f"VmHWM {o['server_vmhwm_mb']} MB.",
        ]
    path.write_text("\n".join(lines) + "\n")


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    e = r["engine"]
    out = []
    for b in ("batch16", "batch1"):
        ratio = e["onnx_fp32"][b]["images_per_s"] / e["resnet50_pytorch_eager"][b]["images_per_s"]
        r[f"onnx_fp32_vs_resnet50_{b}"] = round(ratio, 2)
        out.append(
            {
                "target": f"ONNX Runtime fp32 >= {TARGET_SPEEDUP:.0f}x ResNet-50 eager ({b})",
                "measured": f"{ratio:.2f}x",
                "pass": ratio >= TARGET_SPEEDUP,
            }
        )
    for name, s in r["service"].items():
        out.append(
            {
                "target": f"p99 < {TARGET_P99_MS:.0f} ms at concurrency 8, every answer 200 "
                f"({name})",
                "measured": f"{s['p99_ms_at_8']} ms",
                "pass": s["p99_target_met"],
            }
        )
        o = s["overload"]
        out.append(
            {
                "target": f"overload {OVERLOAD}: only 200/503, RSS growth < "
                f"{RSS_GROWTH_LIMIT_MB:.0f} MB ({name})",
                "measured": f"{o['statuses']} (warm-up: {o.get('warmup_statuses', '-')}), "
                f"+{o['rss_growth_mb']} MB",
                "pass": s["overload_target_met"],
            }
        )
    return out


# ---------------------------------------------------------------- main


def seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint or shipped model name (default: the default)")
    p.add_argument("--duration", type=seconds, default=10.0, help="seconds per load level")
    p.add_argument("--quick", action="store_true", help="2 s per level, one served model")
    args = p.parse_args(argv)
    if no_datasets(DATA, "fashion-products-small", "beauty-shades"):
        return 0
    model = resolve_model(args.model)
    if not model.is_file():
        print(f"error: {model}: model file not found", file=sys.stderr)
        return 2
    duration = 2.0 if args.quick else args.duration
    warmup = 1.0 if args.quick else 2.0
    engine_s = 1.0 if args.quick else 5.0
    sets = photo_sets()
    files = sets["mixed"]
    result: dict[str, Any] = {
        "command": shlex.join(
            ["python", "benchmarks/serve.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "revision": git_revision(),
        "model": str(model),
        "machine": machine(),
        "photos": {k: len(v) for k, v in sets.items()},
        "engine_seconds_per_case": engine_s,
        "load_seconds": duration,
        "warmup_seconds": warmup,
    }
    with tempfile.TemporaryDirectory() as tmp:
        cases = engine_cases(model, Path(tmp), files, args.quick)
        result["engine"] = bench_engines(cases, files, engine_s)
        engine = Engine(cases["pytorch_eager"])
        result["decode_ms"] = {k: decode_times(engine, v) for k, v in sets.items()}
        served = ["pytorch_eager", "onnx_fp32"]
        if args.quick:  # only the faster one
            served = [max(served, key=lambda n: result["engine"][n]["batch16"]["images_per_s"])]
        result["service"] = {}
        for name, (set_name, paths) in itertools.product(served, sets.items()):
            photos = [(f.name, f.read_bytes()) for f in paths]
            server = Server(cases[name], Path(tmp) / f"serve-{name}.log")
            try:
                health = server.wait_ready()
                print(f"serving {name} ({health['backend']}) at {server.url}", flush=True)
                s = asyncio.run(bench_service(server, photos, duration, warmup))
                info = {"file": cases[name].name, "backend": health["backend"], "photos": set_name}
                result["service"][f"{name}, {set_name} photos"] = s | info
            finally:
                server.stop()
    m = result["machine"]
    m["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    warnings = []
    if args.quick:
        warnings.append("Smoke run (--quick): levels too short for verdicts.")
    if m["load_average_at_start"][0] > m["nproc"] / 2:  # at the end it counts this run too
        warnings.append(
            "Machine busy with other jobs: numbers are unreliable, PyTorch eager most of all "
            "(its OpenMP threads spin-wait when the CPUs are oversubscribed; "
            "OMP_WAIT_POLICY=passive avoids that)."
        )
    if warnings:
        result["warning"] = " ".join(warnings)
        print(f"warning: {result['warning']}", file=sys.stderr)
    result["targets"] = targets(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("serve-quick.json" if args.quick else "serve.json")
    out.write_text(json.dumps(result, indent=2))
    write_markdown(result, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    print(f"results: {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
