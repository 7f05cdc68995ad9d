"""The accuracy benchmark's machinery, in its --quick mode on a few rows."""

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT


def load(name, folder="benchmarks"):
    if str(ROOT / "benchmarks") not in sys.path:  # the scripts import their sibling benchlib
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_accuracy_benchmark_quick_runs_and_resumes(datasets, tmp_path, capsys):
    bench = load("accuracy")
    results = tmp_path / "acc.json"
    args = [
        "--quick",
        "--data",
        str(datasets),
        "--seeds",
        "0",
        "--tables",
        "A",
        "C",
        "--only",
        "A1",
        "A3",
        "C1 ",  # not C10
        "--results",
        str(results),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    assert bench.main(args) == 0
    store = json.loads(results.read_text())
    assert set(store["runs"]) == {"A1|seed0", "A3|seed0", "C1|seed0"}  # keyed by row id
    a3 = store["runs"]["A3|seed0"]
    assert a3["name"] == "A3 multi-task, no attention"  # with its description
    assert 0 <= a3["metrics"]["category.accuracy"] <= 1 and a3["revision"]
    # the recorded command runs the same again: "C1 " (not C10) stays one quoted argument
    assert shlex.split(a3["command"]) == ["python", "benchmarks/accuracy.py", *args]
    assert store["runs"]["C1|seed0"]["metrics"]["shade.median_de2000"] > 0
    table = results.with_suffix(".md").read_text()
    assert "| A3 multi-task, no attention" in table and "Table C" in table
    capsys.readouterr()
    assert bench.main(args) == 0  # every finished run is kept and skipped
    assert "== " not in capsys.readouterr().out


def test_accuracy_benchmark_resumes_an_interrupted_run(datasets, tmp_path, capsys):
    """A run stopped after its first epoch goes on from there at the next start (its wall
    time adds up), unless its code revision or config changed; a finished run is redone."""
    import torch

    bench = load("accuracy")
    results, runs = tmp_path / "acc.json", tmp_path / "runs"
    args = ["--quick", "--data", str(datasets), "--seeds", "0", "--tables", "A"]
    args += ["--only", "A3", "--results", str(results), "--runs-dir", str(runs)]
    assert bench.main(args) == 0
    (run,) = runs.glob("A3*-s0")
    last, log, revision = run / "last.pt", run / "metrics.jsonl", (run / "revision").read_text()
    state = torch.load(last, weights_only=False)
    name = "A3|seed0"

    def restart(epochs_done=1, started_at=revision, **config_changes):
        config = bench.apply(state["config"], config_changes)
        torch.save(state | {"epoch": epochs_done - 1, "elapsed": 1000.0, "config": config}, last)
        (run / "revision").write_text(started_at)
        results.unlink()
        capsys.readouterr()
        assert bench.main(args) == 0
        return capsys.readouterr().out, json.loads(results.read_text())["runs"][name]

    out, stored = restart()  # as if stopped after epoch 1 of 2
    assert "resumed from" in out and stored["resumed_at_epoch"] == 2
    assert stored["train_seconds"] > 1000  # epoch 2 redone, and logged once:
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    for case in ({"train.lr": 0.5}, {"started_at": "0000000"}, {"epochs_done": 2}):
        out, stored = restart(**case)
        assert "resumed from" not in out and "resumed_at_epoch" not in stored
        assert stored["train_seconds"] < 1000 and len(log.read_text().splitlines()) == 2
        assert ("not resuming" in out) == ("epochs_done" not in case)  # finished: no word


@pytest.mark.slow
def test_accuracy_benchmark_domain_pretraining_starts_from_the_catalogue_run(datasets, tmp_path):
    import torch

    bench = load("accuracy")
    results, runs = tmp_path / "acc.json", tmp_path / "runs"
    common = ["--quick", "--data", str(datasets), "--seeds", "0"]
    common += ["--results", str(results), "--runs-dir", str(runs)]
    # without the whole-catalogue run there is nothing to start from: skipped, not failed
    assert bench.main([*common, "--tables", "A", "--only", "(B1)"]) == 0
    assert json.loads(results.read_text())["runs"] == {}

    assert bench.main([*common, "--tables", "B", "A", "--only", "B1", "(B1)"]) == 0
    store = json.loads(results.read_text())
    assert set(store["runs"]) == {"B1|seed0", "A8-b1|seed0"}  # "(B1)": its description
    b1 = torch.load(store["runs"]["B1|seed0"]["checkpoint"], weights_only=False)
    ckpt = torch.load(store["runs"]["A8-b1|seed0"]["checkpoint"], weights_only=False)
    init = torch.load(ckpt["config"]["model"]["weights"], weights_only=True)
    # the row's backbone started as B1's, tensor for tensor
    b1_backbone = {
        k.removeprefix("backbone."): v for k, v in b1["model"].items() if k.startswith("backbone.")
    }
    assert init.keys() == b1_backbone.keys()
    assert all(torch.equal(init[k], b1_backbone[k]) for k in init)


@pytest.mark.slow
def test_table_b_flip_rows_evaluate_their_runs_checkpoint_on_photo_and_mirror(
    datasets, tmp_path, monkeypatch
):
    bench = load("accuracy")
    results = tmp_path / "acc.json"
    args = ["--quick", "--data", str(datasets), "--seeds", "0", "--tables", "B"]
    args += ["--results", str(results), "--runs-dir", str(tmp_path / "runs")]
    assert bench.main([*args, "--only", "B6"]) == 0  # no B3 run yet: skipped, not failed
    assert json.loads(results.read_text())["runs"] == {}
    calls = []
    evaluate = bench.evaluate

    def spy(checkpoint, **kwargs):
        calls.append((str(checkpoint), kwargs.get("flip_tta", False)))
        return evaluate(checkpoint, **kwargs)

    monkeypatch.setattr(bench, "evaluate", spy)
    assert bench.main([*args, "--only", "B3", "B6"]) == 0
    runs = json.loads(results.read_text())["runs"]
    b3, b6 = runs["B3|seed0"], runs["B6|seed0"]
    assert calls[-1] == (b3["checkpoint"], True)  # B6: B3's model, photo + mirror
    assert b6["metrics"].keys() == b3["metrics"].keys()
    assert all(0 <= v <= 1 for v in b6["metrics"].values())


@pytest.mark.slow
def test_table_b_ensemble_row_averages_every_seed_of_its_row_on_photo_and_mirror(
    datasets, tmp_path, monkeypatch
):
    bench = load("accuracy")
    monkeypatch.setattr(bench, "SEEDS", (0, 1))  # two quick runs suffice
    results = tmp_path / "acc.json"
    args = ["--quick", "--data", str(datasets), "--tables", "B", "--results", str(results)]
    args += ["--runs-dir", str(tmp_path / "runs"), "--only", "B4", "B10"]
    assert bench.main([*args, "--seeds", "0"]) == 0  # seed 1 missing: B10 skipped
    assert list(json.loads(results.read_text())["runs"]) == ["B4|seed0"]
    calls = []
    evaluate = bench.evaluate

    def spy(checkpoint, **kwargs):
        calls.append((checkpoint, kwargs["split"], kwargs.get("flip_tta", False)))
        return evaluate(checkpoint, **kwargs)

    monkeypatch.setattr(bench, "evaluate", spy)
    assert bench.main([*args, "--seeds", "1"]) == 0  # B4 seed 1, then B10 once
    runs = json.loads(results.read_text())["runs"]
    members = [runs[f"B4|seed{s}"]["checkpoint"] for s in (0, 1)]
    assert runs["B10|seed0"]["checkpoints"] == members
    assert calls[-2:] == [(members, "test", True), (members, "val", True)]
    assert runs["B10|seed0"]["metrics"].keys() == runs["B4|seed0"]["metrics"].keys()


def test_accuracy_rows_can_start_from_the_c10_default(tmp_path):
    """C13 / C14 start from the default shipped at C10_DEFAULT, read from git."""
    import torch

    bench = load("accuracy")
    out = bench.backbone_of_run({"runs": {}}, bench.C10_DEFAULT, tmp_path / "init.pt")
    if out is None:
        pytest.skip(f"no git history with revision {bench.C10_DEFAULT} here")
    source = torch.load(tmp_path / "init-source.pt", weights_only=False)
    assert source["config"]["model"]["image_size"] == 96  # C10: 96 px, linear colour head
    assert not source["config"]["model"].get("pixel_colour")
    init = torch.load(out, weights_only=True)
    backbone = {
        k[len("backbone.") :]: v for k, v in source["model"].items() if k.startswith("backbone.")
    }
    assert init.keys() == backbone.keys()  # the backbone, nothing else, in float32
    assert all(
        v.dtype == torch.float32 and torch.equal(v, backbone[k].float()) for k, v in init.items()
    )
    assert bench.backbone_of_run({"runs": {}}, "B1", tmp_path / "b1.pt") is None


def test_accuracy_shipped_defaults_come_from_a_folder_where_there_is_no_git(tmp_path, monkeypatch):
    """On a machine with a copy of the checkout and no .git (a lent GPU), the shipped
    defaults are read from $BEAUTYTAG_SHIPPED_DIR/REVISION.pt; a missing one is None."""
    bench = load("accuracy")
    copies = tmp_path / "shipped"
    copies.mkdir()
    (copies / f"{bench.C16_DEFAULT}.pt").write_bytes(b"the C16 default")
    monkeypatch.setenv("BEAUTYTAG_SHIPPED_DIR", str(copies))
    out = bench.checkpoint_of({"runs": {}}, bench.C16_DEFAULT, tmp_path / "t.pt")
    assert out == tmp_path / "t.pt" and out.read_bytes() == b"the C16 default"
    assert bench.checkpoint_of({"runs": {}}, bench.C10_DEFAULT, tmp_path / "b.pt") is None


def test_accuracy_merge_adds_runs_of_parallel_results_files(tmp_path, capsys):
    bench = load("accuracy")
    published = json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())
    keys = sorted(published["runs"])[:3]
    mine, theirs = tmp_path / "acc.json", tmp_path / "w1.json"
    mine.write_text(json.dumps({"runs": {keys[0]: published["runs"][keys[0]]}}))
    changed = published["runs"][keys[0]] | {"seed": 99}  # the same run done again elsewhere
    theirs.write_text(
        json.dumps({"runs": {keys[0]: changed} | {k: published["runs"][k] for k in keys[1:]}})
    )
    assert bench.main(["--results", str(mine), "--merge", str(theirs)]) == 0
    store = json.loads(mine.read_text())
    assert sorted(store["runs"]) == keys
    assert store["runs"][keys[0]]["seed"] != 99  # a run already here is kept
    table = mine.with_suffix(".md").read_text()
    assert all(f"| {bench.label(k.split('|')[0])} [" in table for k in keys)
    # the same row and seed at another revision is added beside it, as its own row
    again = published["runs"][keys[1]] | {"revision": "abc1234", "device": "cpu"}
    theirs.write_text(json.dumps({"runs": {keys[1]: again}}))
    assert bench.main(["--results", str(mine), "--merge", str(theirs)]) == 0
    store = json.loads(mine.read_text())
    assert sorted(store["runs"]) == sorted([*keys, f"{keys[1]}|abc1234"])
    assert store["runs"][keys[1]] == published["runs"][keys[1]]
    assert f"{bench.label(keys[1].split('|')[0])} [abc1234]" in mine.with_suffix(".md").read_text()
    keys = sorted(store["runs"])

    broken = tmp_path / "broken.json"
    broken.write_text('{"runs": {"X|seed0": {"name": "X"}}}')
    capsys.readouterr()
    assert bench.main(["--results", str(mine), "--merge", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.json: run 'X|seed0' has no seed, metrics" in err and "nothing merged" in err
    assert sorted(json.loads(mine.read_text())["runs"]) == keys  # nothing half-merged


def test_accuracy_pick_ranks_runs_by_the_validation_score(tmp_path, capsys):
    bench = load("accuracy")
    val = dict.fromkeys(bench.PICK_METRICS, 0.5)
    runs = {
        "C10|seed0": {"val_metrics": val | {"category.accuracy": 0.6}, "checkpoint": "a.pt"},
        "C10|seed1": {"val_metrics": val | {"category.accuracy": 1.0}, "checkpoint": "b.pt"},
        "C10|seed2": {"val_metrics": {"category.accuracy": 1.0}},  # lacks the others
        "C7|seed0": {"val_metrics": val | {"color.accuracy": 1.0}},  # another row
        "C100|seed0": {"val_metrics": val},  # starts as C10, is not C10
    }
    results = tmp_path / "acc.json"
    results.write_text(json.dumps({"runs": runs}))
    assert bench.main(["--results", str(results), "--pick", "C10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[:2] for line in lines[1:3]] == [
        ["0.6000", "C10|seed1"],  # (1.0 + 4 * 0.5) / 5
        ["0.5200", "C10|seed0"],
    ]
    assert "b.pt" in lines[1]
    # then how validation agrees with test over the ranked runs (these have no test metrics)
    assert lines[3] == "validation vs test, score: r = - over 0 runs"
    assert len(lines) == 4 + len(bench.PICK_METRICS)
    assert json.loads(results.read_text()) == {"runs": runs}  # only read


def test_accuracy_pick_says_how_far_validation_agrees_with_test():
    bench = load("accuracy")
    val = dict.fromkeys(bench.PICK_METRICS, 0.5)

    def run(v: float, t: float) -> dict:
        return {"val_metrics": val | {"category.accuracy": v}, "metrics": {"category.accuracy": t}}

    same = bench.agreement([run(0.6, 0.7), run(0.8, 0.9), run(0.7, 0.8)])
    assert "validation vs test, category.accuracy: r = +1.00 over 3 runs" in same
    flipped = bench.agreement([run(0.6, 0.9), run(0.8, 0.7), run(0.7, 0.8)])
    assert "validation vs test, category.accuracy: r = -1.00 over 3 runs" in flipped
    # the score and colour need test values that these runs do not have
    assert "validation vs test, score: r = - over 0 runs" in same
    assert "validation vs test, color.accuracy: r = - over 0 runs" in same


def test_accuracy_only_takes_row_ids_whole_and_other_patterns_as_parts():
    bench = load("accuracy")
    assert bench.label("C16").startswith("C16 as C12, colour histogram")
    assert not bench.selects(["C12"], "C16")  # a row id is the row, not a mention of it
    assert bench.selects(["C16"], "C16") and bench.selects(["C12", "C16"], "C16")
    assert bench.selects(["(B1)"], "A8-b1")  # words of its description
    assert bench.selects(["C1 "], "C1")
    assert not bench.selects(["C1"], "C10")
    assert not bench.selects([], "C16")
    # a row number names its rows, an id one of them
    a8 = [i for i in bench.row_entries() if bench.selects(["A8"], i)]
    assert len(a8) == 7 and all(i.startswith("A8-") for i in a8)
    assert [i for i in a8 if bench.selects(["A8-192px"], i)] == ["A8-192px"]
    assert [i for i in a8 if bench.selects(["A8-lite2"], i)] == ["A8-lite2-128px", "A8-lite2-192px"]
    assert bench.selects(["model soup"], "C40") and not bench.selects(["model soup"], "C39")


def test_accuracy_rows_are_data_keyed_by_ids_that_the_stored_runs_use(tmp_path):
    """The three row files hold every row once, by id; every stored run (and superseded
    one) is keyed by the id of a row there; --report rebuilds the committed tables."""
    bench = load("accuracy")
    ids = list(bench.row_entries())
    assert [i[0] for i in ids] == sorted(i[0] for i in ids)  # table A, then B, then C
    assert all(bench.ROW_ID.fullmatch(i) for i in ids)
    store = json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())
    for key, run in (store["runs"] | store["superseded"]).items():
        row, seed, *revision = key.split("|")
        assert row in ids and seed == f"seed{run['seed']}", key
        assert run["name"].split()[1:] == bench.label(row).split()[1:], key  # its description
    assert set(store["speed"]) <= set(ids)
    bench.write_report(store, tmp_path / "report.md")
    committed = (ROOT / "benchmarks" / "results" / "accuracy.md").read_text()
    assert (tmp_path / "report.md").read_text() == committed


def write_rows(folder: Path, **files: str) -> Path:
    """Row files in `folder`: the committed ones, but those given (table letter -> text)."""
    folder.mkdir()
    bench = load("accuracy")
    for table, name in bench.TABLES.items():
        text = files.get(table) or (bench.ROWS / name).read_text()
        (folder / name).write_text(text)
    return folder


def test_row_files_refuse_repeated_ids_unknown_fields_and_references(tmp_path):
    bench = load("accuracy")
    row = "A1:\n  description: x\n  baseline: logreg\n"
    cases = {
        "twice": (row + row, "'A1' appears 2 times"),
        "table": ("C99:\n  description: x\n  baseline: mean\n", "not an id of table A"),
        "id": ("A 1:\n  description: x\n  baseline: logreg\n", "not an id of table A"),
        "field": (row.replace("baseline", "baselin"), "unknown fields ['baselin']"),
        "undescribed": ("A1:\n  baseline: logreg\n", "or no description"),
        "reference": ("A1:\n  description: x\n  tta_of: A99\n", "tta_of 'A99' names no row"),
        "soup": ("A1:\n  description: x\n  soup_of: [C29@abc, C999]\n", "'C999' names no row"),
    }
    for case, (text, problem) in cases.items():
        with pytest.raises(ValueError, match=re.escape(problem)):
            bench.read_rows(write_rows(tmp_path / case, A=text))
    rows = bench.read_rows(write_rows(tmp_path / "fine", A=row.replace("A1", "A1-x")))
    assert "A1-x" in rows and "A1" not in rows and "C29" in rows


def test_editing_a_description_keeps_the_stored_runs(tmp_path, monkeypatch):
    """A run is stored under its row's id: a new description relabels it in the report, and
    --only finds the row by the new words."""
    bench = load("accuracy")
    c = (bench.ROWS / "table_c.yaml").read_text()
    old = "as C29, 60 epochs"
    assert c.count(f"description: {old}\n") == 1
    folder = write_rows(tmp_path / "rows", C=c.replace(old, "C29 trained for 60 epochs"))
    monkeypatch.setattr(bench, "ROWS", folder)
    run = {"name": f"C33 {old}", "seed": 0, "metrics": {"shade.median_de2000": 3.21}}
    run |= {"train_seconds": 1.0, "device": "cpu", "revision": "abc1234"}
    bench.write_report({"runs": {"C33|seed0": run}}, tmp_path / "acc.md")
    table = (tmp_path / "acc.md").read_text()
    assert "| C33 C29 trained for 60 epochs [abc1234] | 1 | 3.210 |" in table
    assert bench.selects(["trained for 60"], "C33") and not bench.selects([old], "C33")


def test_untrained_model_is_the_row_model_with_random_weights(datasets, tmp_path, capsys):
    """scripts/untrained_model.py: a row's model to time before it is trained."""
    import torch

    from beautytag.checkpoint import load_checkpoint

    script = load("untrained_model", "scripts")
    out = tmp_path / "c21.pt"
    assert script.main(["C21", str(out), "--data", str(datasets)]) == 0
    model, cfg, _ = load_checkpoint(out)
    row = load("accuracy").rows(datasets, "C")["C21"]
    assert (cfg.model.backbone, cfg.model.image_size) == ("tf_efficientnet_lite2", 96)
    assert cfg.model.pixel_colour_pool == row["model"]["pixel_colour_pool"] == 4
    assert [a.name for a in cfg.schema.attributes] == [a["name"] for a in row["attributes"]]
    x = torch.rand(2, 3, 96, 96)
    assert model(x)["category"].shape == (2, len(cfg.schema.attributes[0].classes))
    # a row that trains nothing (a baseline) is refused, with a message
    assert script.main(["C2", str(tmp_path / "c2.pt"), "--data", str(datasets)]) == 2
    assert "names 0 trained rows" in capsys.readouterr().err


def test_distillation_rows_are_taught_by_the_same_seed_of_their_teacher_row(
    datasets, tmp_path, capsys
):
    bench = load("accuracy")
    name = "C22"
    row = bench.rows(datasets, "C")[name]
    raw = {k: v for k, v in row.items() if k != "backbone_from"}  # the teacher part only
    store = {"runs": {}}
    assert bench.resolve_markers(store, f"{name}|seed1", raw, 1, tmp_path / "i.pt") is None
    assert "needs the checkpoint of C21 seed 1" in capsys.readouterr().out

    teacher = tmp_path / "c21-s1.pt"
    teacher.write_bytes(b"a checkpoint")
    store["runs"]["C21|seed0"] = {"checkpoint": str(tmp_path / "elsewhere.pt")}
    store["runs"]["C21|seed1"] = {"checkpoint": str(teacher)}
    resolved = bench.resolve_markers(store, f"{name}|seed1", raw, 1, tmp_path / "i.pt")
    assert resolved["train"]["distill_from"] == str(teacher)
    assert "teacher_from" not in resolved and "distill_from" not in raw["train"]
    assert bench.config_from_dict(resolved).train.distill_from == str(teacher)


def test_c23_is_taught_by_the_default_shipped_at_c16_default_read_from_git(datasets, tmp_path):
    import torch

    bench = load("accuracy")
    name = "C23"
    raw = bench.rows(datasets, "C")[name]
    assert raw["teacher_from"] == bench.C16_DEFAULT and raw["backbone_from"] == bench.C10_DEFAULT
    for rev in bench.SHIPPED:
        if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", rev]).returncode:
            pytest.skip(f"no git history with revision {rev} here")
    resolved = bench.resolve_markers({"runs": {}}, f"{name}|seed2", raw, 2, tmp_path / "i.pt")
    teacher = Path(resolved["train"]["distill_from"])
    assert teacher == tmp_path / "i-teacher.pt"
    shown = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{bench.C16_DEFAULT}:src/beautytag/weights/default.pt"],
        capture_output=True,
        check=True,
    )
    assert teacher.read_bytes() == shown.stdout
    cfg = torch.load(teacher, weights_only=False)["config"]["model"]
    assert cfg["image_size"] == 96 and cfg["pixel_colour"] == ["color"]  # C16's config
    # the student is C15: the same config, started from C10_DEFAULT's backbone
    c15 = bench.rows(datasets, "C")["C15"]
    assert bench.without_marker(raw) == bench.without_marker(c15)
    assert Path(resolved["model"]["weights"]) == tmp_path / "i.pt"


def test_c30_is_c23_taught_by_the_accurate_model_shipped_at_c28_accurate(datasets, tmp_path):
    import torch

    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c30, c23 = rows["C30"], rows["C23"]
    assert c30 == c23 | {"teacher_from": bench.C28_ACCURATE}
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", bench.C28_ACCURATE]).returncode:
        pytest.skip(f"no git history with revision {bench.C28_ACCURATE} here")
    resolved = bench.resolve_markers({"runs": {}}, "C30|seed0", c30, 0, tmp_path / "i.pt")
    teacher = torch.load(resolved["train"]["distill_from"], weights_only=False)["config"]
    assert teacher["model"]["image_size"] == 192  # the accurate model, not a default


def test_c27_is_c23_with_twice_the_epochs_and_c29_c27_without_early_stopping(datasets):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c23, c27 = rows["C23"], rows["C27"]
    assert c27["train"] | {"epochs": 15, "patience": 5} == c23["train"]
    assert (c27["train"]["epochs"], c27["train"]["patience"]) == (30, 8)  # C9's schedule
    assert {k: v for k, v in c27.items() if k != "train"} == {
        k: v for k, v in c23.items() if k != "train"
    }
    c29 = rows["C29"]
    assert c29["train"] | {"patience": 8} == c27["train"] and c29["train"]["patience"] >= 30
    assert {k: v for k, v in c29.items() if k != "train"} == {
        k: v for k, v in c27.items() if k != "train"
    }


def test_c31_is_c29_taught_by_the_accurate_model(datasets):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c29 = rows["C29"]
    c31 = rows["C31"]
    assert c31 == c29 | {"teacher_from": bench.C28_ACCURATE}
    assert c31 == rows["C30"] | {"train": c29["train"]}


def test_c32_averages_c29_and_c31_of_a_seed_and_measures_the_soup(datasets, tmp_path):
    """C32's two rows differ only in the teacher (one start, one config), and run_soup
    evaluates the averaged checkpoint on test and validation (tiny models, 48 photos)."""
    from .conftest import make_tiny_model

    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c29, c31 = rows["C32"]["soup_of"]
    assert (c29, c31) == (bench.at("C29", "ac73a83"), "C31")  # C29's first runs
    assert bench.without_marker(rows["C29"]) == bench.without_marker(rows[c31])
    assert rows["C29"]["backbone_from"] == rows[c31]["backbone_from"]
    model = {"image_size": 96, "pixel_colour": ["color"], "pixel_colour_pool": 4}
    store = {"runs": {}}
    for i, row in enumerate((c29, c31)):
        path = make_tiny_model(tmp_path / f"{i}.pt", model)
        store["runs"][f"{row.partition('|')[0]}|seed1"] = {"checkpoint": str(path)}
    store["runs"]["C29|seed1"]["revision"] = "ac73a83"
    out = tmp_path / "soup" / "soup.pt"
    assert bench.run_soup(store, [c29, c31], 0, datasets, out, quick=True) is None  # no seed 0
    run = bench.run_soup(store, [c29, c31], 1, datasets, out, quick=True)
    assert run["checkpoint"] == str(out) and out.is_file()
    assert 0 <= run["metrics"]["category.accuracy"] <= 1
    assert 0 <= run["val_metrics"]["category.accuracy"] <= 1
    assert run["test_images"] > 0


def test_c33_is_c29_with_twice_its_epochs(datasets):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c29, c33 = rows["C29"], rows["C33"]
    assert c33 == c29 | {"train": c29["train"] | {"epochs": 60, "patience": 60}}


def test_c37_is_c29_at_112_px(datasets):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c29, c37 = rows["C29"], rows["C37"]
    assert c37 == c29 | {"model": c29["model"] | {"image_size": 112}}
    assert c29["model"]["image_size"] == 96


def test_c38_is_c37_taught_by_c31_of_the_same_seed(datasets, tmp_path, capsys):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c37, c38 = rows["C37"], rows["C38"]
    assert c38 == c37 | {"teacher_from": "C31"}
    assert rows["C31"]["teacher_from"] == bench.C28_ACCURATE
    c38 = c38 | {"backbone_from": None}  # the teacher alone
    # without C31's run of that seed the row is skipped, not run untaught
    assert bench.resolve_markers({"runs": {}}, "C38", c38, 1, tmp_path / "init.pt") is None
    assert "needs the checkpoint of C31 seed 1" in capsys.readouterr().out


def test_c39_is_c29_taught_by_c31_of_the_same_seed(datasets):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c39 = rows["C39"]
    assert c39 == rows["C29"] | {"teacher_from": "C31"}


def assert_one_start(bench, rows: dict, names: list[str]) -> None:
    """The rows start from one backbone and init with one model config: their runs of a seed
    can be averaged (a model soup)."""
    names = [r.partition("|")[0] for r in names]  # the rows, without at()'s revision
    starts = {(rows[r]["backbone_from"], rows[r].get("init_from")) for r in names}
    assert len(starts) == 1  # one start: the weights can be averaged
    models = [bench.without_marker(rows[r])["model"] for r in names]
    assert all(m == models[0] for m in models)


def test_c34_c35_average_runs_that_start_from_the_same_weights(datasets):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c34 = rows["C34"]["soup_of"]
    c35 = rows["C35"]["soup_of"]
    first = bench.at("C29", "ac73a83")  # C29's first runs, the only ones then
    assert c34 == [first, "C31", "C33"] and c35 == ["C31", "C33"]
    assert_one_start(bench, rows, c34)


def test_c40_c42_average_c39_with_runs_that_start_from_the_same_weights(datasets):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c40 = rows["C40"]["soup_of"]
    c41 = rows["C41"]["soup_of"]
    c42 = rows["C42"]["soup_of"]
    first = bench.at("C29", "ac73a83")  # C29's first runs, the only ones then
    assert c40 == ["C39", "C33"] and c41 == ["C39", first]
    assert c42 == [first, "C31", "C33", "C39"]
    assert_one_start(bench, rows, c42)


def test_c43_is_c29_taught_by_the_c40_soup_of_the_same_seed(datasets, tmp_path, capsys):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c43 = rows["C43"]
    assert c43 == rows["C29"] | {"teacher_from": "C40"}
    assert "soup_of" in rows["C40"]
    key = "C43|seed0"
    assert bench.resolve_markers({"runs": {}}, key, c43, 0, tmp_path / "init.pt") is None
    assert "needs the checkpoint of C40 seed 0" in capsys.readouterr().out


def test_c45_c46_are_c29_on_part_of_the_training_photos(datasets):
    from beautytag.config import config_from_dict
    from beautytag.data import read_samples

    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    sizes = {}
    for name, fraction in [
        ("C45", 0.5),
        ("C46", 0.25),
        ("C29", 1.0),
    ]:
        changed = {"data.train_fraction": fraction} if fraction < 1 else {}
        assert rows[name] == bench.apply(rows["C29"], changed)
        cfg = config_from_dict(bench.without_marker(rows[name]))
        sizes[fraction] = Counter(s.split for s in read_samples(cfg))
    for fraction in (0.5, 0.25):  # rounded per source (two sources)
        assert abs(sizes[fraction]["train"] - fraction * sizes[1.0]["train"]) <= 1
    assert sizes[0.25]["val"] == sizes[0.5]["val"] == sizes[1.0]["val"]
    assert sizes[0.25]["test"] == sizes[1.0]["test"]


def test_c44_is_c29_taught_by_the_three_shipped_defaults_read_from_git(datasets, tmp_path):
    """C44's teachers are the default.pt files of three revisions, written one file each and
    named as a list in train.distill_from (an ensemble); C16_DEFAULT's is C29's own teacher."""
    import torch

    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    revisions = [bench.C16_DEFAULT, bench.C29_DEFAULT, bench.C39_DEFAULT]
    assert rows["C44"] == rows["C29"] | {"teacher_from": revisions}
    assert rows["C29"]["teacher_from"] == bench.C16_DEFAULT
    for rev in revisions:
        if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", rev]).returncode:
            pytest.skip(f"no git history with revision {rev} here")
    resolved = bench.resolve_markers({"runs": {}}, "C44", rows["C44"], 0, tmp_path / "i.pt")
    teachers = [Path(p) for p in resolved["train"]["distill_from"]]
    assert teachers == [tmp_path / f"i-teacher{i}.pt" for i in range(3)]
    notes = []
    for rev, path in zip(revisions, teachers, strict=True):
        blob = f"{rev}:src/beautytag/weights/default.pt"
        shown = subprocess.run(["git", "-C", str(ROOT), "show", blob], capture_output=True)
        assert path.read_bytes() == shown.stdout
        notes.append(torch.load(path, weights_only=False)["note"])
    assert len(set(notes)) == 3  # three different models
    cfg = bench.config_from_dict(resolved)
    assert cfg.train.distill_from == [str(p) for p in teachers]


def test_b3_b4_b5_are_b1_with_more_pixels_epochs_and_backbone_lr(datasets):
    bench = load("accuracy")
    rows = bench.rows(datasets, "B")
    b1, b3, b4 = rows["B1"], rows["B3"], rows["B4"]
    assert b3["model"] == b1["model"] | {"image_size": 160}
    assert b3["train"] == b1["train"] | {"epochs": 16, "patience": 16}
    assert b4 == b3 | {"train": b3["train"] | {"backbone_lr_mult": 1.0}}
    assert rows["B5"] == b3 | {"model": b3["model"] | {"image_size": 224}}
    assert rows["B6"] == {"tta_of": "B3"}
    assert rows["B7"] == {"tta_of": "B4"}
    assert rows["B8"] == b4 | {"teacher_from": "B4"}  # self-distillation
    assert rows["B9"] == {"tta_of": "B8"}
    assert rows["B11"] == b4 | {"teacher_from": "B8"}  # a second generation
    b10 = "B10"
    assert rows[b10] == {"ensemble_of": "B4", "flip": True}
    assert b1["train"]["backbone_lr_mult"] < 1.0
    c = bench.rows(datasets, "C")  # C36: C29 from B3's backbone instead of C10_DEFAULT's
    c36 = c["C36"]
    assert c36 == c["C29"] | {"backbone_from": "B3"}
    assert c["C29"]["backbone_from"] == bench.C10_DEFAULT


def test_c28_is_the_shipped_accurate_config_with_what_helped_the_default(datasets):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c5 = rows["C5"]
    c28 = rows["C28"]
    pixel = ("pixel_colour", "pixel_colour_pool")
    assert {k: v for k, v in c28["model"].items() if k not in pixel} == c5["model"]
    assert (c28["model"]["pixel_colour"], c28["model"]["pixel_colour_pool"]) == (["color"], 4)
    assert c28["model"]["image_size"] // 4 == 48  # C12's 48 x 48 histogram
    assert c28["train"] == c5["train"] and c28["attributes"] == c5["attributes"]
    assert (c28["backbone_from"], c28["teacher_from"]) == (bench.C10_DEFAULT, bench.C16_DEFAULT)


def test_parallel_script_runs_every_row_that_needs_another_run_in_its_second_phase(datasets):
    """benchmarks/accuracy_parallel.sh names the rows of phase 2; a row that starts from
    another run of this benchmark (backbone, flip, teacher, soup) must be among them, and only
    those."""
    import re
    import shlex

    bench = load("accuracy")
    script = (ROOT / "benchmarks" / "accuracy_parallel.sh").read_text()
    later = shlex.split(re.search(r"^later=\((.*)\)", script, re.M).group(1))
    rows = bench.rows(datasets)
    for name, raw in rows.items():
        start = raw.get("backbone_from") or raw.get("init_from")
        needs_run = any(k in raw for k in ("tta_of", "soup_of", "ensemble_of")) or start in rows
        needs_run = needs_run or any(t in rows for t in bench.teachers_of(raw))
        assert bench.selects(later, name) == needs_run, name


def test_catalogue_transfer_reads_catalogue_outputs_through_the_default_label_mapping(
    datasets, tmp_path, capsys
):
    """A catalogue model's articleType / baseColour become the default's category / colour
    as the default's own labels are made (unknown type: Other; colour map; non-family colour:
    no label, so wrong), scored on the Personal Care photos next to the default."""
    import torch

    from beautytag.checkpoint import load_checkpoint, resolve_model, save_checkpoint
    from beautytag.config import config_from_dict
    from beautytag.data import label_from_row
    from beautytag.nn.net import BeautyTagNet

    from .conftest import make_tiny_model

    ct, bench = load("catalogue_transfer"), load("accuracy")
    target = load_checkpoint(resolve_model("default"))[1]
    read = lambda a, v: label_from_row(target.schema[a], "fashion", {ct.READ_AS[a]: v})  # noqa: E731
    assert (read("category", "Lipstick"), read("category", "Tshirts")) == ("Lipstick", "Other")
    assert (read("color", "Navy Blue"), read("color", "Multi")) == ("Blue", None)
    truth = [{"category": "Other", "color": "Blue"}, {"category": "Lipstick", "color": None}]
    predicted = [{"category": "Other", "color": None}, {"category": "Other", "color": "Red"}]
    assert ct.scores(predicted, truth) == {
        "category": {"n": 2, "accuracy": 0.5},
        "color": {"n": 1, "accuracy": 0.0},  # the unlabelled colour is not counted
    }

    cfg = config_from_dict(bench.catalogue_raw(datasets, **{"model.image_size": 64}))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "cat.pt", BeautyTagNet(cfg, pretrained=False), cfg)
    args = ["--data", str(datasets), "--results", str(tmp_path)]
    assert ct.main([str(tmp_path / "cat.pt"), *args]) == 0
    rows = json.loads((tmp_path / "catalogue_transfer.json").read_text())["rows"]
    assert [(r["model"], r["split"]) for r in rows] == [
        ("default (its own heads)", "val"),
        ("cat.pt", "val"),
        ("default (its own heads)", "test"),
        ("cat.pt", "test"),
    ]
    for ours, theirs in zip(rows[::2], rows[1::2], strict=True):  # the same labelled photos
        for a in ("category", "color"):
            assert ours["metrics"][a]["n"] == theirs["metrics"][a]["n"] > 100
            assert 0 <= theirs["metrics"][a]["accuracy"] <= 1
    assert "| cat.pt | test |" in (tmp_path / "catalogue_transfer.md").read_text()
    tiny = make_tiny_model(tmp_path / "tiny.pt")
    capsys.readouterr()
    assert ct.main([str(tiny), *args]) == 2
    assert "tiny.pt: not a whole-catalogue model" in capsys.readouterr().err


def test_c47_c48_c49_c53_are_c29_or_c33_with_cutmix(datasets):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c47 = rows["C47"]
    assert c47 == bench.apply(rows["C29"], {"train.cutmix": 0.5})
    c48 = rows["C48"]
    assert c48 == bench.apply(rows["C29"], {"train.cutmix": 1.0})
    c49 = rows["C49"]
    assert c49 == c48 | {"teacher_from": bench.C39_DEFAULT}
    assert bench.teachers_of(c49) == [bench.C39_DEFAULT]
    c53 = rows["C53"]
    assert c53 == bench.apply(rows["C33"], {"train.cutmix": 1.0})
    assert bench.row_config(datasets, "C29", False).train.cutmix == 0  # C29 unmixed


def test_c50_c52_average_c48_with_runs_that_start_from_the_same_weights(datasets):
    bench = load("accuracy")
    rows = bench.rows(datasets, "C")
    c50 = rows["C50"]["soup_of"]
    c51 = rows["C51"]["soup_of"]
    c52 = rows["C52"]["soup_of"]
    second = bench.at("C29", "d2129f7")  # C29's second runs
    assert c50 == ["C48", second] and c51 == ["C48", "C49"]
    assert c52 == [second, "C48", "C49"]
    assert_one_start(bench, rows, c52)


def test_run_checkpoint_falls_back_to_a_rerun_at_another_revision(tmp_path):
    """A row's run whose checkpoint is gone is replaced by a rerun of the same row and seed
    (merge_runs' ``key|revision``) whose checkpoint is here; the first run comes first."""
    bench = load("accuracy")
    first, rerun = tmp_path / "first.pt", tmp_path / "rerun.pt"
    rerun.write_bytes(b"x")
    store = {
        "runs": {
            "R|seed0": {"checkpoint": str(first)},
            "R|seed0|abc1234": {"checkpoint": str(rerun)},
            "R|seed1": {"checkpoint": str(rerun)},
        }
    }
    assert bench.run_checkpoint(store, "R", 0) == rerun  # the first run's file is gone
    first.write_bytes(b"x")
    assert bench.run_checkpoint(store, "R", 0) == first
    assert bench.run_checkpoint(store, "R", 2) is None
    assert bench.run_checkpoint(store, "R2", 0) is None  # another row's name


def test_run_checkpoint_at_a_revision_takes_that_revisions_run_only(tmp_path, datasets):
    """A source pinned with at() (C50's C29: its second runs) never falls back to the run of
    another revision, whichever files are here."""
    bench = load("accuracy")
    first, rerun = tmp_path / "first.pt", tmp_path / "rerun.pt"
    first.write_bytes(b"x")
    store = {
        "runs": {
            "R|seed0": {"checkpoint": str(first), "revision": "ac73a83"},
            "R|seed0|d2129f7": {"checkpoint": str(rerun), "revision": "d2129f7"},
        }
    }
    assert bench.run_checkpoint(store, bench.at("R", "d2129f7"), 0) is None  # not here yet
    rerun.write_bytes(b"x")
    assert bench.run_checkpoint(store, bench.at("R", "d2129f7"), 0) == rerun
    assert bench.run_checkpoint(store, bench.at("R", "ac73a83"), 0) == first
    assert bench.run_checkpoint(store, "R", 0) == first  # unpinned: the first run first
    assert bench.run_checkpoint(store, bench.at("R", "0000000"), 0) is None
    # a pinned row's config is the row's own
    c29 = bench.row_config(datasets, bench.at("C29", "d2129f7"), False)
    assert c29 == bench.row_config(datasets, "C29", False)


def test_category_errors_knn_vote_weighs_the_nearest_training_photos():
    bench = load("category_errors")
    bank = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    labels = np.array([0, 0, 1, 1, 2])
    votes = bench.knn_vote(np.array([[1.0, 0.05], [0.05, 1.0]]), bank, labels, k=2)
    np.testing.assert_allclose(votes.sum(1), 1.0)
    assert votes.shape == (2, 3) and votes[0, 0] == 1.0  # both neighbours are class 0
    assert votes[1].argmax() == 1 and votes[1, 0] == 0  # class 1's two photos are nearest
    # with all five as neighbours the nearer class still weighs most
    assert bench.knn_vote(np.array([[0.0, 1.0]]), bank, labels, k=5)[0].argmax() == 1


def test_category_errors_counts_errors_and_variants_on_the_shipped_default(datasets, tmp_path):
    bench = load("category_errors")
    out = tmp_path / "ce"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "category_errors.py"), "--out", str(out)]
        + ["--models", "default"],
        check=True,
        capture_output=True,
    )
    r = json.loads(out.with_suffix(".json").read_text())["results"][0]
    for split in ("val", "test"):
        s = r[split]
        assert 0.8 < s["accuracy"] == round(s["correct"] / s["n"], 4) < 1
        assert 0 < s["errors_weak"] <= s["n"] - s["correct"]
        assert all(abs(s[v] - s["correct"]) <= 0.1 * s["n"] for v in bench.VARIANTS)
    assert "| default | test |" in out.with_suffix(".md").read_text()


def fake_model(val_category, test_category, val_color=None, test_color=None):
    """Probabilities (one-hot of the given answers, 2 classes) as ensembles.probabilities
    returns them, against labels all 0 (colour: the last photo unlabelled)."""

    def split(category, color):
        category, color = np.array(category), np.array(color if color else category)
        color_y = np.zeros(len(color), int)
        color_y[-1] = -1
        return {
            "p_category": np.eye(2)[category],
            "y_category": np.zeros(len(category), int),
            "p_color": np.eye(2)[color],
            "y_color": color_y,
        }

    return {"val": split(val_category, val_color), "test": split(test_category, test_color)}


def test_ensembles_average_members_and_select_forward_on_validation_only():
    bench = load("ensembles")
    a = fake_model([0, 0, 1, 1], [0, 1, 1, 1])
    b = fake_model([0, 1, 0, 1], [1, 0, 0, 0])
    c = fake_model([1, 1, 1, 1], [0, 0, 0, 0])  # the best on test, the worst on validation
    # averaged probabilities: a and b tie on photos 1 and 2 (argmax: class 0, right) and
    # agree on 0 (right) and 3 (wrong)
    assert bench.correct([a, b], "val", "category") == (3, 4)
    assert bench.correct([a], "val", "color") == (2, 3)  # the unlabelled photo is not counted
    assert bench.correct([a, c], "test", "category") == (4, 4)
    steps = bench.greedy({"a": a, "b": b, "c": c}, 5)
    assert steps == [["a"], ["a", "b"], ["a", "b", "c"]]  # c, best on test, is chosen last
    s = bench.scores([a, b])
    assert s["val"]["category"] == [3, 4] and s["test"]["color"] == [3, 3]


def test_ensembles_group_seeds_and_name_committed_models():
    bench = load("ensembles")
    names = ["runs/C48-x-s0/best.pt", "runs/C48-x-s1/best.pt", "runs/C53-s0/best.pt", "default"]
    assert bench.seed_groups(names) == {"C48-x": names[:2]}  # C53 has one seed here
    reruns = ["again/C48-x-s0/best.pt", "again/C48-x-s1/best.pt"]  # the same row, run again
    assert bench.seed_groups(names + reruns) == {"runs/C48-x": names[:2], "again/C48-x": reruns}
    assert bench.short("7260413:src/beautytag/weights/default.pt") == "default@7260413"
    assert bench.short("runs/C48-x-s0/best.pt") == "C48-x-s0"
    rows = bench.ensembles({n: fake_model([0, 1], [0, 0]) for n in names}, 2)
    kinds = [r["kind"] for r in rows]
    assert kinds == ["single"] * 4 + ["seeds", "all", "greedy", "greedy"]
    assert rows[5]["members"] == names and rows[4]["name"] == "C48-x (its 2 seeds)"
    table = "\n".join(bench.table(rows))
    assert "| all 4 | 4 | 1 / 2 (0.500) | 1 / 1 (1.000) | **2 / 2 (1.000)** |" in table


def test_ensembles_benchmark_on_the_shipped_models(datasets, tmp_path):
    out = tmp_path / "ens"
    models = ["default", "accurate", "HEAD:src/beautytag/weights/default.pt"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ensembles.py"), "--out", str(out)]
        + ["--greedy", "2", "--models", *models],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"default", "accurate", "default@HEAD", "all 3", "greedy 1", "greedy 2"}
    # the committed default is the shipped one: the same answers
    assert rows["default"]["test"] == rows["default@HEAD"]["test"]
    for r in rows.values():
        for split, n in (("val", 178), ("test", 206)):
            correct, total = r[split]["category"]
            assert total == n and 0.8 * n < correct < n
    assert "| all 3 | 3 |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("script", ["ensembles", "category_errors"])
def test_ensembles_and_category_errors_name_a_missing_model_without_a_traceback(
    datasets, tmp_path, script
):
    for model, problem in (
        (str(tmp_path / "nope.pt"), "model file not found"),
        (str(ROOT / "README.md"), "not a beautytag checkpoint"),
        ("deadbee:src/beautytag/weights/default.pt", "no such file at revision deadbee"),
    ):
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / f"{script}.py")]
            + ["--out", str(tmp_path / "out"), "--models", model],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2
        assert f"error: {model}: {problem}" in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "out.json").exists()


def test_accuracy_store_errors_are_one_line_and_leave_the_store_as_it_was(tmp_path, capsys):
    """--merge of a file that is not a results file, or of runs the report could not show,
    merges nothing; --report / --pick on a missing or broken file say so (exit 2)."""
    bench = load("accuracy")
    store = tmp_path / "store.json"
    run = {"name": "Z1 x", "seed": 0, "metrics": {"a": 1.0}, "train_seconds": 1.0}
    run |= {"device": "cpu", "revision": "abc1234"}
    store.write_text(json.dumps({"runs": {"Z1 x|seed0": run}}))
    before = store.read_text()
    files = {
        "bad.json": {"runs": {"Z2 y|seed0": {"metrics": {"a": 1}}}},  # no name, revision...
        "list.json": {"runs": []},
        "corrupt.json": "not json",
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    cases = [
        (
            ["--merge", str(tmp_path / "bad.json")],
            "has no name, seed, train_seconds, device, revision",
        ),
        (["--merge", str(tmp_path / "list.json")], "no mapping 'runs'"),
        (["--merge", str(tmp_path / "corrupt.json")], "not a readable JSON file"),
        (["--merge", str(tmp_path / "missing.json")], "no such results file"),
    ]
    for args, problem in cases:
        capsys.readouterr()
        assert bench.main(["--results", str(store), *args]) == 2
        err = capsys.readouterr().err
        assert problem in err and args[1] in err and "nothing merged" in err
        assert store.read_text() == before
    for args, problem in [
        (["--results", str(tmp_path / "typo.json"), "--report"], "no such results file"),
        (["--results", str(tmp_path / "typo.json"), "--pick", "C29"], "no such results file"),
        (["--results", str(tmp_path), "--report"], "not a readable JSON file"),
    ]:
        assert bench.main(args) == 2
        assert problem in capsys.readouterr().err
    assert not (tmp_path / "typo.json").exists()  # not created empty
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"runs": {"Z1 x|seed0": run | {"revision": "def5678"}}}))
    assert bench.main(["--results", str(store), "--merge", str(good)]) == 0
    assert set(json.loads(store.read_text())["runs"]) == {"Z1 x|seed0", "Z1 x|seed0|def5678"}


def test_accuracy_quick_runs_write_elsewhere_than_full_runs():
    bench = load("accuracy")
    assert bench.default_runs_dir(True) != bench.default_runs_dir(False)
    assert bench.default_runs_dir(False) == ROOT / "runs" / "bench"


def test_accuracy_runs_record_the_checkpoints_their_markers_resolve_to(tmp_path):
    bench = load("accuracy")
    teacher = tmp_path / "c31.pt"
    teacher.write_bytes(b"x")
    store = {"runs": {"C31|seed1": {"checkpoint": str(teacher), "revision": "r"}}}
    rows = bench.rows(tmp_path, "C")
    sources = bench.marker_sources(store, rows["C39"], 1)  # C29 (from B1) taught by C31
    assert sources[1:] == [str(teacher)]
    assert bench.marker_sources(store, rows["C49"], 0)[1:] == [
        f"{bench.C39_DEFAULT}:src/beautytag/weights/default.pt"
    ]
    assert bench.marker_sources(store, rows["C29"], 0)[-1].startswith(bench.C16_DEFAULT)


def test_git_revision_marks_uncommitted_code_changes(tmp_path, monkeypatch):
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    bench = load("benchlib")
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("x = 1\n")
    (repo / "README.md").write_text("# r\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    monkeypatch.setattr(bench, "ROOT", repo)
    monkeypatch.delenv("BEAUTYTAG_REVISION", raising=False)
    clean = bench.git_revision()
    assert len(clean) >= 7 and not clean.endswith("-dirty")
    (repo / "README.md").write_text("# docs only\n")
    assert bench.git_revision() == clean  # docs and results are not code
    (repo / "src" / "a.py").write_text("x = 2\n")
    assert bench.git_revision() == clean + "-dirty"


def test_scripts_refuse_bad_arguments_in_one_line(tmp_path):
    """A missing model or an impossible setting is one line naming it, before any work."""
    cases = [
        ("scripts/ship_model.py", [str(tmp_path / "no.pt")], "no.pt: model file not found"),
        ("benchmarks/serve.py", ["--model", str(tmp_path / "no.pt")], "model file not found"),
        ("benchmarks/serve.py", ["--duration", "0"], "not a number of seconds above 0"),
        ("benchmarks/predict.py", ["--n", "0"], "must be a whole number of 1 or more"),
        ("benchmarks/export.py", ["--models", str(tmp_path / "no.pt")], "nothing written"),
    ]
    for script, args, problem in cases:
        done = subprocess.run(
            [sys.executable, str(ROOT / script), *args], capture_output=True, text=True
        )
        assert done.returncode in (1, 2) and problem in done.stderr, (script, done.stderr)
        assert "Traceback" not in done.stderr
    assert not list((ROOT / "src" / "beautytag" / "weights").glob("*.new.pt"))


def test_predict_benchmark_passes_when_exactly_the_broken_files_are_reported(
    datasets, tmp_path, monkeypatch
):
    """The command exits 1 when it skipped files: with the 5 broken ones among 12 photos the
    benchmark passes (and writes its results); a model that is not there fails it, and
    nothing is written."""
    bench = load("predict")
    results = tmp_path / "results"
    monkeypatch.setattr(bench, "RESULTS", results)
    monkeypatch.setattr(sys, "argv", ["predict.py", "--n", "12"])
    assert bench.main() == 0
    r = json.loads((results / "predict.json").read_text())
    assert r["files"] == r["answers"] == 12 and r["errors"] == 5 and r["exit_code"] == 1
    assert shlex.split(r["command"]) == ["python", "benchmarks/predict.py", "--n", "12"]
    (results / "predict.json").unlink()
    monkeypatch.setattr(sys, "argv", ["predict.py", "--n", "12", "--model", str(tmp_path / "x")])
    assert bench.main() == 1
    assert not (results / "predict.json").exists()


def test_category_errors_outputs_are_the_scores_the_model_gives(datasets, tmp_path):
    """A calibrated model's probabilities there are its scaled ones (model.temperatures)."""
    from beautytag.checkpoint import load_checkpoint

    from .conftest import make_tiny_model

    bench = load("category_errors")
    probs = []
    for t in (1.0, 0.05):
        path = make_tiny_model(tmp_path / f"{t}.pt", {"temperatures": {"category": t}}, limit=8)
        model, cfg, _ = load_checkpoint(path)
        probs.append(bench.outputs(model, cfg, "val", ["fashion"], ("category", "color"))["p"])
    np.testing.assert_array_equal(probs[0].argmax(1), probs[1].argmax(1))  # the same answers
    assert probs[1].max(1).mean() > probs[0].max(1).mean() + 0.2  # T = 0.05: far sharper
