"""Fuzzing the image loader: small real JPEG (baseline and progressive), PNG, WebP and GIF
files, made with Pillow, mutated by Hypothesis (bit flips, overwritten and inserted bytes,
truncations, size fields rewritten to huge values) and fed to
``beautytag.images.load_for_model``. The property: it returns a model input or raises
ImageError, nothing else. ``tests/test_fuzz.py`` runs it briefly in the suite; run by hand,

    python benchmarks/fuzz.py --examples 5000

writes how many inputs ran, what became of them and any finding (another exception) to
``benchmarks/results/fuzz.json`` and ``fuzz.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import resource
import shlex
import struct
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from beautytag.images import ImageError, load_for_model

SIZE = 32  # the model input the loader prepares for (small: decoding at 1/8 scale is tried)
MEAN = STD = (0.5, 0.5, 0.5)
# what a size field is rewritten to, beside any value it can hold: its extremes, the
# largest side allowed (images.MAX_SIDE) and sides whose square passes the pixel budget at
# 1/8 scale but not at full size
HUGE = (0, 1, 0x7FFF, 0xFFFF, 40_000, 65_535, 2**31 - 1, 2**32 - 1)
# what one input may add to the process's peak memory: the decoding budget, MAX_PIXELS
# (40 megapixels), at up to 8 bytes each (a CMYK progressive JPEG's coefficients, 2 bytes
# a sample), and room for the conversions to RGB
PEAK_GROWTH_MB = 1024

FRAME_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # a JPEG's SOFn


def seeds() -> dict[str, bytes]:
    """Small real files, one of each kind the loader must survive mangled versions of."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 24 * 20, dtype=np.uint8).reshape(20, 24)
    rgb = Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], -1))
    noise = Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), "RGBA")
    out = {}
    for name, img, fmt, kwargs in (
        ("baseline.jpg", rgb, "JPEG", {}),
        ("progressive.jpg", rgb, "JPEG", {"progressive": True}),
        ("cmyk.jpg", rgb.convert("CMYK"), "JPEG", {}),
        ("rgb.png", rgb, "PNG", {}),
        ("rgba_interlaced.png", noise, "PNG", {"interlace": 1}),
        ("grey16.png", Image.fromarray(ramp.astype(np.uint16) * 257), "PNG", {}),
        ("lossy.webp", rgb, "WEBP", {"quality": 80}),
        ("lossless_alpha.webp", noise, "WEBP", {"lossless": True}),
        ("animated.gif", rgb.convert("P"), "GIF", {"save_all": True, "append_images": [noise]}),
    ):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kwargs)
        out[name] = buf.getvalue()
    return out


SEEDS = seeds()


def size_fields(data: bytes | bytearray) -> list[list[tuple[int, str]]]:
    """The headers in `data` that give a width and a height, each as the (offset, struct
    format) of its fields, by the format: a JPEG's frame headers, a PNG's IHDR, a GIF's
    screen and image descriptors, a WebP's VP8, VP8L (one field: 14 bits each) and VP8X."""
    headers: list[list[tuple[int, str]]] = []
    if data[:2] == b"\xff\xd8":
        for i in range(2, len(data) - 8):
            if data[i] == 0xFF and data[i + 1] in FRAME_MARKERS:
                headers.append([(i + 5, ">H"), (i + 7, ">H")])
    elif data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        headers.append([(16, ">I"), (20, ">I")])
    elif data[:3] == b"GIF" and len(data) >= 10:
        headers.append([(6, "<H"), (8, "<H")])
        if (i := data.find(b"\x2c", 13)) > 0 and i + 9 <= len(data):
            headers.append([(i + 5, "<H"), (i + 7, "<H")])
    elif data[:4] == b"RIFF":
        if (i := data.find(b"\x9d\x01\x2a")) > 0 and i + 7 <= len(data):
            headers.append([(i + 3, "<H"), (i + 5, "<H")])
        if (i := data.find(b"VP8L")) > 0 and i + 13 <= len(data):
            headers.append([(i + 9, "<I")])
        if (i := data.find(b"VP8X")) > 0 and i + 18 <= len(data):
            headers.append([(i + 12, "<H"), (i + 15, "<H")])  # the low 16 of 24 bits
    return headers


def rewrite_size(data: bytearray, offset: int, fmt: str, value: int) -> None:
    """Write `value` (cut to the field's width) to a size field; a PNG's IHDR keeps a right
    CRC, so that the new size is read, not refused as a broken chunk."""
    bits = 8 * struct.calcsize(fmt)
    struct.pack_into(fmt, data, offset, value & ((1 << bits) - 1))
    if data[:8] == b"\x89PNG\r\n\x1a\n" and offset in (16, 20) and len(data) >= 33:
        struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A seed file and one to four mutations of it."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("flip", "bytes", "insert", "truncate", "size")))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "bytes":
            new = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(new)] = new
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "truncate":  # mostly past the headers (an empty file is one case)
            del data[draw(st.integers(0, 3)) * len(data) // 4 + at // 4 :]
        elif headers := size_fields(data):  # a header's width and height, or one of them
            for offset, fmt in draw(st.sampled_from(headers)):
                if draw(st.integers(0, 3)):
                    limit = 2 ** (8 * struct.calcsize(fmt))
                    value = draw(st.sampled_from(HUGE) | st.integers(0, limit))
                    rewrite_size(data, offset, fmt, value)
    return name, bytes(data)


def peak_mb() -> float:
    """The process's peak memory so far (resident set), in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**2 if sys.platform == "darwin" else 1024)  # bytes there, KiB here


def check(name: str, data: bytes) -> str:
    """The property: a model input of the right shape, or an ImageError naming the input,
    and the process's peak memory raised by less than PEAK_GROWTH_MB. Returns what became
    of the input ("decoded", or the ImageError's problem, cut to its kind)."""
    before = peak_mb()
    try:
        img, x = load_for_model(data, SIZE, MEAN, STD, name=name)
        assert img.mode == "RGB" and tuple(x.shape) == (3, SIZE, SIZE), (img.mode, x.shape)
        outcome = "decoded"
    except ImageError as e:
        assert str(e).startswith(f"{name}: ") and "\n" not in str(e), str(e)
        outcome = e.problem.split(":")[0].split(" (")[0]
    grew = peak_mb() - before
    assert grew < PEAK_GROWTH_MB, f"peak memory grew by {grew:.0f} MB ({outcome})"
    return outcome


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,  # a huge claimed size may take a moment to be refused or decoded
        database=None,  # nothing written into the checkout
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def run(examples: int) -> dict:
    """Run the property on `examples` inputs, counting outcomes and collecting findings
    (exceptions other than ImageError) instead of stopping at the first."""
    outcomes: Counter = Counter()
    findings: list[dict] = []
    per_seed: Counter = Counter()

    @fuzz_settings(examples)
    @given(mutated())
    def prop(case: tuple[str, bytes]) -> None:
        name, data = case
        per_seed[name] += 1
        try:
            outcomes[check(name, data)] += 1
        except Exception as e:  # a finding: kept, with the input's hash and its first bytes
            outcomes["finding"] += 1
            findings.append(
                {
                    "seed": name,
                    "error": f"{type(e).__name__}: {e}"[:300],
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                    "head_hex": data[:64].hex(),
                }
            )

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    prop()
    return {
        "inputs": sum(per_seed.values()),
        "findings": len(findings),
        "seconds": round(time.monotonic() - start, 1),
        "peak_rss_growth_mb": round(
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024, 1
        ),
        "inputs_per_seed": dict(sorted(per_seed.items())),
        "outcomes": dict(outcomes.most_common()),
        "finding_details": findings,
    }


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v} |" for k, v in result["outcomes"].items())
    seeds_line = ", ".join(f"`{k}` {v}" for k, v in result["inputs_per_seed"].items())
    found = "\n".join(
        f"- `{f['seed']}` ({f['bytes']} bytes, sha256 {f['sha256'][:12]}): {f['error']}"
        for f in result["finding_details"]
    )
    out.with_suffix(".md").write_text(
        f"""# Fuzzing the image loader

Command: `{result["command"]}` at {result["revision"]} (Hypothesis {result["hypothesis"]},
Pillow {result["pillow"]}, {result["machine"]}).

{result["inputs"]} mutated inputs (bit flips, overwritten, inserted and cut bytes, width and
height fields rewritten to huge values) of small JPEG (baseline, progressive, CMYK), PNG
(RGB, interlaced RGBA, 16-bit grey), WebP (lossy, lossless with alpha) and GIF (animated)
files went through `beautytag.images.load_for_model` in {result["seconds"]} s; the
process's peak memory grew by {result["peak_rss_growth_mb"]} MB in all. **Findings:
{result["findings"]}** (an exception other than ImageError, a malformed answer, or one input
raising the peak memory by {PEAK_GROWTH_MB} MB or more).

Inputs per seed file: {seeds_line}.

| outcome | inputs |
| --- | --- |
{rows}

{found or "No finding."}
"""
    )


def main(argv: list[str] | None = None) -> int:
    import hypothesis
    import PIL
    from benchlib import git_revision

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fuzz"))
    args = parser.parse_args(argv)
    result = {
        "command": shlex.join(["python", "benchmarks/fuzz.py", *(argv or sys.argv[1:])]),
        "revision": git_revision(),
        "hypothesis": hypothesis.__version__,
        "pillow": PIL.__version__,
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
    } | run(args.examples)
    write(result, args.out)
    print(f"{result['inputs']} inputs, {result['findings']} findings -> {args.out}.json/.md")
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
