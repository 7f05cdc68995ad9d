import copy

import pytest

from beautytag.config import config_from_dict, load_config
from beautytag.schema import SchemaError, parse_schema

from .conftest import ROOT


def attr(**kw):
    base = {
        "name": "category",
        "kind": "single",
        "classes": ["a", "b"],
        "sources": {"s": {"column": "c"}},
    }
    return base | kw


def test_default_config_is_valid():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg.schema.names == ["category", "cosmetic", "color", "shade", "finish", "function"]
    assert cfg.model.gate["attribute"] == "cosmetic"  # "no" answers are rejected photos
    assert cfg.schema["shade"].num_outputs == 3
    assert cfg.schema["function"].kind == "multi"
    assert cfg.data_root.name == "datasets"


@pytest.mark.parametrize(
    "bad, message",
    [
        (attr(kind="triple"), "'kind' must be one of"),
        (attr(classes=["a"]), "at least two"),
        (attr(classes=["a", "a"]), "duplicate classes"),
        (attr(name="not an identifier"), "identifier"),
        (attr(name="image"), "exported model's input"),
        (attr(weight=-1), "'weight'"),
        (attr(colour="x"), "unknown keys"),
        (attr(sources={"s": {"column": "c", "map": {"x": "zzz"}}}), "not a class"),
        (attr(sources={"s": {"column": "c", "other": "zzz"}}), "not a class"),
        (attr(sources={"s": {"column": "c", "rule": "magic"}}), "unknown rule"),
        (attr(sources={"s": {}}), "needs a 'column'"),
        ({"name": "shade", "kind": "shade", "sources": {"s": {"columns": ["L", "a"]}}}, "three"),
        ({"name": "shade", "kind": "shade", "classes": ["x", "y"]}, "no classes"),
    ],
)
def test_schema_errors_name_the_attribute_and_problem(bad, message):
    with pytest.raises(SchemaError, match=message):
        parse_schema([bad])


def test_duplicate_attribute_and_empty_schema():
    with pytest.raises(SchemaError, match="defined twice"):
        parse_schema([attr(), attr()])
    with pytest.raises(SchemaError, match="non-empty list"):
        parse_schema([])


def test_config_errors(raw_config, tmp_path):
    bad = copy.deepcopy(raw_config)
    bad["train"]["epochs"] = "ten"
    with pytest.raises(SchemaError, match="train.epochs: must be a number"):
        config_from_dict(bad, where="x.yaml")
    bad["train"]["epochs"] = 2.0  # a whole number written as a float is fine
    assert config_from_dict(bad).train.epochs == 2
    bad["train"]["freeze_epochs"] = 0.5  # not silently 0 (no frozen phase)
    with pytest.raises(SchemaError, match=r"train.freeze_epochs: must be a whole number, got 0.5"):
        config_from_dict(bad, where="x.yaml")
    bad = copy.deepcopy(raw_config)
    bad["model"]["attention"] = "transformer"
    with pytest.raises(SchemaError, match="model.attention: must be one of"):
        config_from_dict(bad)
    bad = copy.deepcopy(raw_config)
    bad["train"]["learning_rate"] = 1
    with pytest.raises(SchemaError, match="unknown keys"):
        config_from_dict(bad)
    for key, value, message in (
        ("train.distill_weight", 1.5, "must be in"),
        ("train.distill_temperature", 0, "must be above 0"),
        ("train.distill_temperature", float("nan"), "must be above 0"),
        ("train.epochs", 0, "must be 1 or more"),
        ("train.batch_size", 0, "must be 1 or more"),
        ("train.lr", -0.1, "must be above 0"),
        ("train.patience", 0, "must be 1 or more"),
        ("train.label_smoothing", 1.0, "must be in"),
        ("model.image_size", 16, "must be 32 or more"),
        ("model.dropout", -0.5, "must be in"),
        ("data.limit", -1, "must be 0"),
        ("train.cutmix", 1.5, "must be in"),
    ):
        bad = copy.deepcopy(raw_config)
        section, name = key.split(".")
        bad[section][name] = value
        with pytest.raises(SchemaError, match=f"x.yaml: {key} {message}"):
            config_from_dict(bad, where="x.yaml")
    for value in (3, ["default", 3], {"a": "default"}):  # a string or a list of strings only
        bad = copy.deepcopy(raw_config)
        bad["train"]["distill_from"] = value
        with pytest.raises(SchemaError, match="x.yaml: train.distill_from: must be a string"):
            config_from_dict(bad, where="x.yaml")
    bad["train"]["distill_from"] = ["default", "accurate"]  # several teachers: an ensemble
    assert config_from_dict(bad).train.distill_from == ["default", "accurate"]
    bad["model"]["backbone"] = ["tf_efficientnet_lite0"]  # other string keys: no list
    with pytest.raises(SchemaError, match="model.backbone: must be a string, got"):
        config_from_dict(bad)
    bad = copy.deepcopy(raw_config)
    bad["data"]["sources"] = bad["data"]["sources"][:1]
    with pytest.raises(SchemaError, match="reads source '(shades|wild)'"):
        config_from_dict(bad)
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed")
    with pytest.raises(SchemaError, match="broken.yaml: invalid YAML at line 1, column 17: "):
        load_config(path)
    with pytest.raises(SchemaError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_aliases_are_refused(tmp_path):
    """A "billion laughs" config (each alias repeats the one before nine times) would grow
    to gigabytes once read; aliases are refused with one line naming the file."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SchemaError) as e:
        load_config(path)
    assert str(e.value) == (
        f"{path}: invalid YAML at line 2, column 10: aliases (*name) are not allowed in a config"
    )
    path.write_text((ROOT / "configs" / "default.yaml").read_text() + "x: &n 1\ny: *n\n")
    with pytest.raises(SchemaError, match="line .*: aliases"):  # even a harmless one
        load_config(path)


def test_config_names_and_split_fractions_are_checked(raw_config):
    for section_key, value, message in (
        ("train.monitor", "category.macro-f1", "train.monitor must be 'loss' or an attribute"),
        ("train.monitor", "colour.accuracy", "known: category.accuracy"),
        ("train.monitor", "shade.accuracy", "got 'shade.accuracy'"),
    ):
        bad = copy.deepcopy(raw_config)
        section, key = section_key.split(".")
        bad[section][key] = value
        with pytest.raises(SchemaError, match=f"x.yaml: .*{message}"):
            config_from_dict(bad, where="x.yaml")
    good = copy.deepcopy(raw_config)
    good["train"]["monitor"] = "shade.median_de2000"
    assert config_from_dict(good).train.monitor == "shade.median_de2000"
    bad = copy.deepcopy(raw_config)
    bad["train"] |= {"balance": "sampler", "balance_attribute": "Category"}
    with pytest.raises(SchemaError, match="balance_attribute must name a single-label attribute"):
        config_from_dict(bad)
    bad["train"]["balance_attribute"] = "function"  # tags: not one class per photo
    with pytest.raises(SchemaError, match="got 'function'"):
        config_from_dict(bad)
    for fractions, message in (
        ({"val_fraction": 15}, r"sources\[1\].val_fraction: must be in \[0, 1\)"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be below 1"),
    ):
        bad = copy.deepcopy(raw_config)
        bad["data"]["sources"][1] |= fractions
        with pytest.raises(SchemaError, match=message):
            config_from_dict(bad)


def test_schema_round_trips_through_dict(raw_config):
    cfg = config_from_dict(raw_config)
    again = config_from_dict(cfg.to_dict())
    assert again.schema == cfg.schema
    assert again.model == cfg.model


def test_check_same_outputs_names_the_attributes_that_differ(raw_config):
    from beautytag.training.evaluate import check_same_outputs

    cfg = config_from_dict(raw_config)
    other = copy.deepcopy(raw_config)
    other["attributes"][2]["classes"] = other["attributes"][2]["classes"][:-1]  # colour
    name = other["attributes"][2]["name"]
    with pytest.raises(ValueError, match=rf"\['{name}'\] are missing on one side or differ"):
        check_same_outputs(cfg, config_from_dict(other))
    reordered = copy.deepcopy(raw_config)
    reordered["attributes"].reverse()
    with pytest.raises(ValueError, match="the same ones in another order"):
        check_same_outputs(cfg, config_from_dict(reordered))
    check_same_outputs(cfg, config_from_dict(reordered), ordered=False)  # read by name: fine
    check_same_outputs(cfg, config_from_dict(raw_config))


def test_train_checks_the_command_line_overrides_before_training(tmp_path, capsys):
    from beautytag.cli import main

    out = tmp_path / "run"
    for flag, value, message in (
        ("--epochs", "0", "train.epochs must be 1 or more"),
        ("--image-size", "8", "model.image_size must be 32 or more"),
    ):
        assert (
            main(["train", str(ROOT / "configs" / "default.yaml"), "--out", str(out), flag, value])
            == 2
        )
        assert f"beautytag train: error: command line: {message}" in capsys.readouterr().err
    assert not out.exists()  # nothing was trained or written
