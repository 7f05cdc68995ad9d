"""The API contract says what the server enforces: a bounded Schemathesis run (every check)
against a live ``beautytag serve`` finds no 5xx, no answer outside the spec and no
schema-valid request refused (tests/data/schemathesis.toml says which refusals of
undecodable bytes count as accepted)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CONFIG = Path(__file__).parent / "data" / "schemathesis.toml"
EXAMPLES = int(os.environ.get("BEAUTYTAG_SCHEMATHESIS_EXAMPLES", "15"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_service(tiny_model):
    port = free_port()
    cmd = [sys.executable, "-m", "beautytag.cli", "serve", "--model", str(tiny_model)]
    cmd += ["--port", str(port), "--backend", "torch", "--threads", "1", "--timeout", "20"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"service did not start: {server.stderr.read()}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(10)


def test_schemathesis_finds_nothing(live_service, tmp_path):
    exe = shutil.which("schemathesis")
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    cmd = [exe, "--config-file", str(CONFIG), "run", f"{live_service}/openapi.json"]
    cmd += ["--checks", "all", "--max-examples", str(EXAMPLES), "--seed", "1"]
    cmd += ["--request-timeout", "20", "--no-color"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    # predict, explain, healthz, metrics, search (POST and GET), thumbnail
    assert "Tested: 7" in done.stdout
