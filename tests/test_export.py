"""Export to ONNX / TorchScript, int8 quantisation, parity checks and the engine's backends."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from beautytag.checkpoint import load_checkpoint
from beautytag.cli import main
from beautytag.config import config_from_dict
from beautytag.export import (
    accuracy_cost,
    default_photos,
    export_onnx,
    export_torchscript,
    parity_check,
    quantize_onnx,
    synthetic_photos,
)
from beautytag.images import load_image, preprocess
from beautytag.nn.net import fixed_size_copy
from beautytag.runtime.engine import Engine, expand_paths
from beautytag.runtime.onnx import ExportWrapper, export_model_onnx, onnx_metadata

from .conftest import DATASETS, make_tiny_model

REAL_PHOTOS = DATASETS / "beauty-shades" / "images"


def schema_tuples(cfg):
    return [(a.name, a.kind, a.classes) for a in cfg.schema.attributes]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """data.limit keeps the accuracy-cost test small."""
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt", limit=12)


@pytest.fixture(scope="module")
def onnx_path(tiny_model, tmp_path_factory):
    return export_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_photos(tmp_path_factory.mktemp("synthetic"), n=12)


def batch(model_path, photos):
    _, cfg, _ = load_checkpoint(model_path)
    m = cfg.model
    return torch.stack([preprocess(load_image(p), m.image_size, m.mean, m.std) for p in photos])


def test_onnx_outputs_are_a_tuple_in_schema_order_with_a_dynamic_batch(
    tiny_model, onnx_path, synthetic
):
    import onnxruntime as ort

    model, cfg, _ = load_checkpoint(tiny_model)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == cfg.schema.names
    wrapper = ExportWrapper(model)
    for n in (1, 5):
        x = batch(tiny_model, synthetic[:n])
        outs = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            ref = wrapper(x)
        assert isinstance(ref, tuple) and len(outs) == len(ref) == len(cfg.schema.attributes)
        for a, o, r in zip(cfg.schema.attributes, outs, ref, strict=True):
            assert o.shape == (n, a.num_outputs)
            np.testing.assert_allclose(o, r.numpy(), atol=1e-3)
            if a.kind == "single":
                np.testing.assert_allclose(o.sum(-1), 1.0, atol=1e-5)  # already softmaxed
            elif a.kind == "multi":
                assert ((o >= 0) & (o <= 1)).all()  # already sigmoided


def test_the_export_fixes_same_padding_so_onnx_runtime_folds_it(tiny_model, onnx_path, tmp_path):
    import onnx
    import onnxruntime as ort
    from timm.layers import Conv2dSame

    model, cfg, _ = load_checkpoint(tiny_model)
    fixed = fixed_size_copy(model, cfg.model.image_size)
    assert any(isinstance(m, Conv2dSame) for m in model.modules())  # the original is kept
    assert not any(isinstance(m, Conv2dSame) for m in fixed.modules())
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ref, out = model.eval()(x), fixed(x)
    for name in cfg.schema.names:
        torch.testing.assert_close(out[name], ref[name], rtol=0, atol=1e-6)

    def optimised_ops(path):
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]

    ops = optimised_ops(onnx_path)
    assert "Conv" in ops and "Pad" not in ops  # every pad went into a convolution
    dynamic = export_model_onnx(model, cfg, tmp_path / "dynamic.onnx", fixed_padding=False)
    assert optimised_ops(dynamic).count("Pad") == 5  # timm's run-time pads stay


def test_metadata_makes_the_file_self_describing(tiny_model, onnx_path):
    _, cfg, _ = load_checkpoint(tiny_model)
    meta = onnx_metadata(onnx_path)
    assert meta["format"] == "beautytag-onnx-1"
    assert schema_tuples(config_from_dict(meta["config"])) == schema_tuples(cfg)
    assert [(o["name"], o["kind"], o["classes"]) for o in meta["outputs"]] == schema_tuples(cfg)
    inp = meta["input"]
    assert inp["name"] == "image" and inp["size"] == 64 and inp["letterbox_fill"] == 255
    assert inp["mean"] == cfg.model.mean and inp["std"] == cfg.model.std


def test_parity_on_synthetic_photos(tiny_model, onnx_path, synthetic):
    r = parity_check(tiny_model, onnx_path, synthetic)
    assert r["photos"] == 12 and r["backend"] == "onnxruntime"
    assert r["max_abs_diff"] < 1e-3 and r["labels_identical"] and r["label_agreement"] == 1.0


def test_parity_with_a_pixel_colour_head(synthetic, tmp_path):
    path = make_tiny_model(tmp_path / "pc.pt", model={"pixel_colour": ["color"]})
    model, _, _ = load_checkpoint(path)
    torch.nn.init.normal_(model.heads["color"].colour.weight)  # make the pixels count
    torch.nn.init.normal_(model.heads["color"].where.weight, std=0.1)
    ckpt = torch.load(path, weights_only=False) | {"model": model.state_dict()}
    torch.save(ckpt, path)
    r = parity_check(path, export_onnx(path, tmp_path / "pc.onnx"), synthetic)
    assert r["max_abs_diff"] < 1e-3 and r["labels_identical"]


@pytest.mark.skipif(not REAL_PHOTOS.is_dir(), reason=f"real photos not found at {REAL_PHOTOS}")
def test_parity_on_real_photos(tiny_model, onnx_path):
    r = parity_check(tiny_model, onnx_path, expand_paths([REAL_PHOTOS])[:16])
    assert r["photos"] == 16
    assert r["max_abs_diff"] < 1e-3 and r["labels_identical"]


def test_torchscript_export_parity(tiny_model, synthetic, tmp_path):
    path = export_torchscript(tiny_model, tmp_path / "tiny.ts")
    extra = {"beautytag.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["beautytag.json"])["format"] == "beautytag-torchscript-1"
    r = parity_check(tiny_model, path, synthetic)
    assert r["backend"] == "torchscript"
    assert r["max_abs_diff"] < 1e-3 and r["labels_identical"]


def test_torchscript_export_follows_its_device(tmp_path):
    # the colour heads' CIELAB matrices are buffers, not constants traced on the CPU: a GPU
    # copy of the module would otherwise mix devices
    model = make_tiny_model(tmp_path / "pix.pt", model={"pixel_colour": ["color"]})
    path = export_torchscript(model, tmp_path / "pix.ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path))

    def code(m) -> str:
        own = m.code if hasattr(m, "code") else ""
        return own + "".join(code(c) for _, c in m.named_children())

    assert "rgb_to_xyz_t" in code(module)  # read from the module, wherever it is
    assert 'device("cpu")' not in code(module)


def test_dynamic_quantisation_is_smaller_still_runs_and_reports_agreement(
    tiny_model, onnx_path, synthetic, tmp_path
):
    q = quantize_onnx(onnx_path, tmp_path / "tiny-int8.onnx", "dynamic")
    assert q.stat().st_size < 0.5 * onnx_path.stat().st_size
    meta = onnx_metadata(q)
    assert meta["quantization"]["mode"] == "dynamic" and meta["outputs"][0]["name"] == "category"
    assert meta["quantization"]["calibration_photos"] == 0  # dynamic: none
    r = parity_check(tiny_model, q, synthetic)
    assert r["photos"] == 12 and r["label_agreement"] >= 0.75  # 0.94 at this commit
    diffs = r["max_abs_diff_per_output"]
    assert diffs["shade"] < 0.05  # its colour maths are kept in float (4 Lab units if not)
    assert max(diffs[n] for n in ("category", "color", "finish", "function")) < 0.1


def test_static_quantisation_calibrates_on_photos(tiny_model, onnx_path, synthetic, tmp_path):
    q = quantize_onnx(onnx_path, tmp_path / "tiny-int8-static.onnx", "static", synthetic[:6])
    assert q.stat().st_size < 0.5 * onnx_path.stat().st_size
    assert onnx_metadata(q)["quantization"] == {"mode": "static", "calibration_photos": 6}
    r = parity_check(tiny_model, q, synthetic)
    assert r["label_agreement"] >= 0.75 and r["max_abs_diff_per_output"]["shade"] < 2.0
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx(onnx_path, tmp_path / "x.onnx", "static", [])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    photos = [broken, *synthetic[:3], broken]  # only the usable photos count
    q = quantize_onnx(onnx_path, tmp_path / "tiny-int8-odd.onnx", "static", photos)
    assert onnx_metadata(q)["quantization"] == {"mode": "static", "calibration_photos": 3}
    with pytest.raises(ValueError, match="none usable"):
        quantize_onnx(onnx_path, tmp_path / "x.onnx", "static", [broken])


def test_engine_onnx_backend_matches_torch(tiny_model, onnx_path, synthetic, tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    files = [*synthetic, tmp_path / "bad.jpg"]
    ref = [p.to_dict() for p in Engine(tiny_model, batch_size=4).predict_files(files)]
    ort_engine = Engine(onnx_path, batch_size=4, backend="onnxruntime")
    assert ort_engine.backend.name == "onnxruntime" and ort_engine.model is None
    out = [p.to_dict() for p in Engine(onnx_path, batch_size=5).predict_files(files)]  # auto
    assert out == [p.to_dict() for p in ort_engine.predict_files(files)]
    assert [r["file"] for r in out] == [r["file"] for r in ref]
    assert out[-1]["error"] == ref[-1]["error"] and out[-1]["attributes"] is None
    for a, b in zip(ref[:-1], out[:-1], strict=True):
        assert set(a["attributes"]) == set(b["attributes"])
        for name in ("category", "color", "finish"):
            assert a["attributes"][name]["label"] == b["attributes"][name]["label"]
        assert [t for t, _ in a["attributes"]["function"]["labels"]] == [
            t for t, _ in b["attributes"]["function"]["labels"]
        ]
        assert a["attributes"]["shade"]["lab"] == pytest.approx(
            b["attributes"]["shade"]["lab"], abs=0.02
        )


def test_engine_refuses_mismatched_backends(tiny_model, onnx_path, tmp_path):
    with pytest.raises(ValueError, match="onnxruntime"):
        Engine(onnx_path, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        Engine(onnx_path, backend="tensorrt")
    ts = tmp_path / "model.ts"
    ts.write_bytes(b"not read")
    with pytest.raises(ValueError, match="TorchScript"):
        Engine(ts, backend="onnxruntime")  # (a checkpoint is exported: tests/test_serve.py)
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="fake.onnx"):
        Engine(fake)


@pytest.mark.skipif(
    not (DATASETS / "fashion-products-small").is_dir(), reason=f"datasets not found at {DATASETS}"
)
def test_accuracy_cost_of_quantisation_on_the_test_split(tiny_model, onnx_path, tmp_path):
    q = quantize_onnx(onnx_path, tmp_path / "tiny-int8.onnx", "dynamic")
    r = accuracy_cost(tiny_model, [onnx_path, q], "test")
    assert r["split"] == "test" and r["images"] > 0
    fp32, int8 = r[str(onnx_path)], r[str(q)]
    assert set(fp32["metrics"]) == set(r["torch"]) == set(int8["change"])
    assert abs(fp32["change"]["category"]["accuracy"]) < 1e-6  # fp32 ONNX == PyTorch
    assert -1.0 <= int8["change"]["category"]["accuracy"] <= 1.0


def test_cli_export_prints_parity_then_predict_uses_the_onnx_file(
    tiny_model, synthetic, tmp_path, capsys
):
    out = tmp_path / "cli.onnx"
    argv = ["export", str(tiny_model), "--out", str(out), "--photos", str(synthetic[0].parent)]
    assert main([*argv, "--quantize", "dynamic", "--accuracy-split", "none"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == str(out) and report["parity"]["labels_identical"]
    assert report["parity"]["max_abs_diff"] < 1e-3 and report["parity"]["photos"] == 12
    q = report["quantized"]
    assert q["bytes"] < report["bytes"] and 0 <= q["parity"]["label_agreement"] <= 1
    assert main(["predict", "--model", str(out), str(synthetic[0])]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["error"] is None and set(result["attributes"]) == set(
        config_from_dict(onnx_metadata(out)["config"]).schema.names
    )
    ts = tmp_path / "cli.ts"
    argv = ["export", str(tiny_model), "--format", "torchscript", "--out", str(ts)]
    assert main([*argv, "--photos", str(synthetic[0])]) == 0
    assert json.loads(capsys.readouterr().out)["parity"]["labels_identical"]
    assert main([*argv, "--quantize", "dynamic"]) == 2  # int8 is ONNX only
    assert "onnx" in capsys.readouterr().err


def test_cli_export_refuses_to_overwrite_the_model(tiny_model, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    shutil.copy(tiny_model, ckpt)
    link = tmp_path / "link.pt"
    link.symlink_to(ckpt)
    before = ckpt.read_bytes()
    for out in (ckpt, link):
        assert main(["export", str(ckpt), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"beautytag export: error: {out}: the export would overwrite the model; "
            "give another --out\n"
        )
    assert ckpt.read_bytes() == before
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"an exported model")
    script = tmp_path / "model.ts"
    script.write_bytes(b"an exported model")
    for command in (["export", str(onnx)], ["calibrate", str(onnx)], ["evaluate", str(script)]):
        assert main(command) == 2  # not "would overwrite the model", nor torch's advice
        err = capsys.readouterr().err
        assert f"{command[1]}: an exported model; " in err and "weights_only" not in err
    assert onnx.read_bytes() == b"an exported model"


def test_cli_export_out_must_end_as_its_format_does(tiny_model, tmp_path, capsys):
    """predict and serve pick the runtime by suffix: a wrong or missing one is refused before
    anything is written."""
    no_suffix = tmp_path / "model"
    assert main(["export", str(tiny_model), "--out", str(no_suffix)]) == 2
    err = capsys.readouterr().err
    assert err == f"beautytag export: error: --out {no_suffix}: an ONNX file must end in .onnx\n"
    onnx_name = tmp_path / "x.onnx"
    argv = ["export", str(tiny_model), "--format", "torchscript", "--out", str(onnx_name)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"beautytag export: error: --out {onnx_name}: a TorchScript file must")
    assert ".ts" in err and len(err.splitlines()) == 1
    assert not no_suffix.exists() and not onnx_name.exists()


def test_cli_export_checks_parity_on_at_most_96_given_photos(tiny_model, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(100):
        Image.new("RGB", (16, 12), (2 * i, 100, 200 - i)).save(folder / f"p{i:03d}.png")
    photos, source = default_photos([folder], n=96)
    assert source == "given" and photos == sorted(folder.iterdir())[:96]
    out = tmp_path / "m.onnx"
    assert main(["export", str(tiny_model), "--out", str(out), "--photos", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["parity"]["photos"] == 96


def test_accuracy_cost_refuses_an_exported_model_of_another_checkpoint(tiny_model, tmp_path):
    other = make_tiny_model(tmp_path / "other.pt", model={"image_size": 48})
    onnx_file = export_onnx(other, tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="other.onnx: input size 48, the checkpoint's is 64"):
        accuracy_cost(tiny_model, [onnx_file])
