"""benchmarks/search.py on tiny sizes: what it measures, and that it resumes."""

from __future__ import annotations

import json

import numpy as np

from .test_benchmarks import load


def test_the_benchmark_measures_each_size_once(tmp_path, capsys):
    bench = load("search")
    out = tmp_path / "synthetic"
    args = ["--sizes", "60", "400", "--data", "random", "--queries", "30", "--exact-max", "100"]
    bench.main([*args, "--out", str(out)])
    runs = {r["size"]: r for r in json.loads(out.with_suffix(".json").read_text())["runs"]}
    flat, ivf = runs[60], runs[400]
    assert (flat["kind"], flat["nlist"], flat["recall_at_10"]) == ("flat", None, 1.0)
    assert (ivf["kind"], ivf["nlist"]) == ("ivf", 10)  # min(sqrt(400), 400 / 39)
    assert ivf["calibration_recall_at_10"] >= 0.95 and 1 <= ivf["nprobe"] <= 10
    assert 0 < ivf["recall_at_10"] <= 1 and ivf["filtered_min_results"] == 10
    assert ivf["index_mb"] > 400 * 1280 * 4 / 2**20 and ivf["query_ms"]["p99"] > 0
    assert ivf["command"].startswith("python benchmarks/search.py --sizes 60 400")
    assert ivf["opened_rss_mb"] >= 0 and ivf["build_cpu_s"] > 0
    table = out.with_suffix(".md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in rows}) == 1 and len(rows) == 4
    assert "| random | 400 | ivf | 10 |" in table and "| random | 60 | flat | - |" in table
    capsys.readouterr()
    bench.main([*args, "--out", str(out)])  # both stored: nothing measured again
    assert "added" not in capsys.readouterr().err


def test_mixture_draws_spread_like_their_components():
    bench = load("search")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 64))
    real = np.repeat(centres, 40, axis=0) + 0.1 * rng.standard_normal((200, 64))
    data = bench.Data("mixture", real.astype(np.float32))
    assert len(data.means) <= 200 // bench.COMPONENT_SIZE
    assert min(len(d) for d in data.deviations) >= bench.MIN_MEMBERS
    x = data.draw(4000, np.random.default_rng(1))
    unit = bench.unit(real)
    assert (bench.unit(x) @ bench.unit(centres).T).max(axis=1).min() > 0.9  # near a cluster
    # spread about their component's mean as its members are (not copies of them)
    nearest = np.argmax(bench.unit(x) @ data.means.T, axis=1)
    spread = np.mean(np.sum((x - data.means[nearest]) ** 2, axis=1))
    members = np.mean(np.concatenate([np.sum(d**2, axis=1) for d in data.deviations]))
    assert 0.8 < spread / members < 1.5  # (n / (n - 1) wider: an unbiased covariance)
    assert ((bench.unit(x) @ unit.T).max(axis=1) < 0.9999).all()
