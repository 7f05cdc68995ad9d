from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beautytag.config import config_from_dict
from beautytag.data import (
    MAX_MISSING_SHARE,
    Sample,
    augment_batch,
    classes_without_photos,
    cutmix_batch,
    encode,
    group_split,
    label_from_row,
    read_samples,
    summarise,
)
from beautytag.schema import SchemaError, parse_schema

SCHEMA = parse_schema(
    [
        {
            "name": "category",
            "kind": "single",
            "classes": ["Lipstick", "Lip Gloss", "Other"],
            "sources": {
                "shop": {"column": "type", "map": {"gloss": "Lip Gloss"}, "other": "Other"},
                "lab": {"column": "cat"},
            },
        },
        {
            "name": "finish",
            "kind": "single",
            "classes": ["matte", "gloss"],
            "sources": {"shop": {"column": "title", "rule": "finish"}},
        },
        {
            "name": "tags",
            "kind": "multi",
            "classes": ["spf", "waterproof"],
            "sources": {"shop": {"column": "tags"}},
        },
        {"name": "shade", "kind": "shade", "sources": {"lab": {"columns": ["L", "a", "b"]}}},
    ]
)


def test_labels_from_rows_with_maps_rules_and_missing_cells():
    row = {"type": "gloss", "title": "Super Matte Lipstick", "tags": "spf, unknown", "L": ""}
    assert label_from_row(SCHEMA["category"], "shop", row) == "Lip Gloss"
    assert label_from_row(SCHEMA["category"], "shop", row | {"type": "Mascara"}) == "Other"
    assert label_from_row(SCHEMA["category"], "shop", row | {"type": ""}) is None  # empty
    assert label_from_row(SCHEMA["category"], "lab", {"cat": "Mascara"}) is None  # no other
    assert label_from_row(SCHEMA["finish"], "shop", row) == "matte"
    assert label_from_row(SCHEMA["finish"], "shop", row | {"title": "Perfume"}) is None
    assert label_from_row(SCHEMA["tags"], "shop", row) == ["spf"]
    assert label_from_row(SCHEMA["shade"], "shop", row) is None  # source not mapped
    assert label_from_row(SCHEMA["shade"], "lab", {"L": "50", "a": "1", "b": ""}) is None
    assert label_from_row(SCHEMA["shade"], "lab", {"L": "50", "a": "x", "b": "2"}) is None
    assert label_from_row(SCHEMA["shade"], "lab", {"L": "50", "a": "1", "b": "2"}) == [50, 1, 2]


def test_encode_gives_masks_per_attribute():
    targets, masks = encode(
        SCHEMA, {"category": "Other", "finish": None, "tags": [], "shade": [50.0, 10.0, -5.0]}
    )
    assert int(targets["category"]) == 2 and bool(masks["category"])
    assert not bool(masks["finish"])
    assert bool(masks["tags"]) and targets["tags"].sum() == 0  # labelled: no tag
    assert torch.equal(targets["shade"], torch.tensor([50.0, 10.0, -5.0]))


def test_group_split_is_deterministic_and_keeps_groups_together():
    brands = [f"brand {i}" for i in range(400)]
    splits = [group_split(b, 0.15, 0.2) for b in brands]
    assert splits == [group_split(b, 0.15, 0.2) for b in brands]
    assert group_split(" Brand 7 ", 0.15, 0.2) == group_split("brand 7", 0.15, 0.2)
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert 0.12 < share["test"] < 0.28 and 0.08 < share["val"] < 0.22


def test_real_sources_split_by_brand_never_share_a_brand(raw_config, datasets):
    cfg = config_from_dict(raw_config)
    samples = read_samples(cfg, sources=["shades"])
    brands = {sp: {s.group for s in samples if s.split == sp} for sp in ("train", "val", "test")}
    assert brands["train"] and brands["test"]
    assert not brands["train"] & brands["test"] and not brands["train"] & brands["val"]
    counts = summarise(read_samples(cfg), cfg.schema)
    assert counts["test"]["category"] >= 206  # the Personal Care test split is all there
    assert 0 < counts["train"]["shade"] < counts["train"]["images"]  # masks really vary


def test_data_limit_keeps_a_spread_of_samples(raw_config, datasets):
    raw_config["data"]["limit"] = 20
    cfg = config_from_dict(raw_config)
    samples = read_samples(cfg, splits=["train"], sources=["fashion"])
    assert len(samples) == 20
    assert len({s.labels["category"] for s in samples}) > 3


def test_an_unknown_source_name_says_which_sources_there_are(raw_config):
    cfg = config_from_dict(raw_config)
    with pytest.raises(
        ValueError,
        match="no data source named fashion-products-small, x; this config has: fashion, shades",
    ):
        read_samples(cfg, sources=["fashion-products-small", "x", "fashion"])


def test_data_train_fraction_thins_the_train_split_only(raw_config, datasets):
    everything = read_samples(config_from_dict(raw_config), sources=["fashion"])
    raw_config["data"]["train_fraction"] = 0.25
    quarter = read_samples(config_from_dict(raw_config), sources=["fashion"])
    by_split = lambda ss, split: [s.path for s in ss if s.split == split]  # noqa: E731
    full, part = by_split(everything, "train"), by_split(quarter, "train")
    assert len(part) == round(len(full) / 4) and set(part) < set(full)
    assert by_split(quarter, "val") == by_split(everything, "val")
    assert by_split(quarter, "test") == by_split(everything, "test")
    cats = Counter(s.labels["category"] for s in quarter if s.split == "train")
    assert cats.most_common(1)[0][0] == "Perfume and Body Mist" and len(cats) > 12
    assert read_samples(config_from_dict(raw_config), sources=["fashion"]) == quarter  # same
    for bad in (0, 1.5):
        raw_config["data"]["train_fraction"] = bad
        with pytest.raises(SchemaError, match="data.train_fraction must be in"):
            config_from_dict(raw_config)


def test_augmentation_never_changes_colour():
    torch.manual_seed(0)
    x = torch.full((8, 3, 64, 64), 255, dtype=torch.uint8)
    x[:, 0, 16:48, 16:48], x[:, 1, 16:48, 16:48], x[:, 2, 16:48, 16:48] = 200, 40, 90
    y = augment_batch(x).round().clamp(0, 255)
    pixels = y.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    white, product = np.array([255.0, 255, 255]), np.array([200.0, 40, 90])
    # every pixel is white, the product colour, or (on an edge) a mix of the two: it lies on
    # the segment between them, so no new hue or saturation appears
    t = (pixels - white) @ (product - white) / np.sum((product - white) ** 2)
    residual = np.abs(pixels - (white + t[:, None] * (product - white))).max(axis=1)
    assert residual.max() < 1.5 and t.min() > -0.01 and t.max() < 1.01
    assert np.mean(np.all(np.abs(pixels - product) < 1, axis=1)) > 0.1
    assert not torch.equal(y[0], y[1])  # samples are augmented differently


def test_cutmix_pastes_one_box_of_another_photo_and_weighs_it_by_its_area():
    torch.manual_seed(0)
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 40, 60).clone()
    shares = []
    for _ in range(20):
        y, perm, lam = cutmix_batch(x)
        assert y.shape == x.shape and sorted(perm.tolist()) == list(range(8))
        own = (y == x)[:, 0]  # (B, H, W): where each photo is still itself
        pasted = y[:, 0] == perm.view(8, 1, 1).float()  # the rest is its partner's, unchanged
        assert torch.all(own | pasted)
        moved = ~own[perm != torch.arange(8)]  # photos paired with another than themselves
        assert torch.allclose(moved.float().mean((1, 2)), torch.tensor(1 - lam))
        rows, cols = moved[0].any(1).nonzero(), moved[0].any(0).nonzero()
        if len(rows):  # the pasted part is one rectangle
            box = moved[0][rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all()
        shares.append(lam)
    assert min(shares) < 0.3 and max(shares) > 0.7  # lambda spreads over (0, 1)
    assert torch.equal(x, torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 40, 60))  # untouched


def folder_config(root, rows: str, schema: list | None = None, **source) -> object:
    """A config reading `root`/photos/labels.csv (text `rows`) with five photos in it,
    img/a.jpg to img/e.jpg."""
    folder = root / "photos"
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for name in ("a", "b", "c", "d", "e"):
        Image.new("RGB", (40, 40), (200, 30, 60)).save(folder / "img" / f"{name}.jpg")
    (folder / "labels.csv").write_bytes(rows.encode("utf-8"))
    schema = schema or [
        {"name": "category", "kind": "single", "classes": ["Lipstick", "Mascara", "Other"],
         "sources": {"mine": {"column": "category", "other": "Other"}}},
        {"name": "color", "kind": "single", "classes": ["Red", "Pink"],
         "sources": {"mine": {"column": "color"}}},
    ]  # fmt: skip
    src = {"name": "mine", "path": "photos", "split_column": "split"} | source
    return config_from_dict({"attributes": schema, "data": {"root": str(root), "sources": [src]}})


def test_labels_csv_as_spreadsheets_write_it(tmp_path):
    # Excel's byte-order mark, spaces after commas in the header, Windows paths, a short row
    # (no trailing cells), class names and split names in another letter case
    rows = (
        "\ufefffile_name, category, color,split\r\n"
        "img\\a.jpg,lipstick,RED,Train\r\n"
        "img\\b.jpg,Mascara\r\n"
        "img/c.jpg,Blusher,pink,Validation\r\n"
    )
    samples = read_samples(folder_config(tmp_path, rows))
    assert [(s.path.name, s.split) for s in samples] == [("a.jpg", "train"), ("c.jpg", "val")]
    assert all(s.path.is_file() for s in samples)
    a, c = (s.labels for s in samples)
    assert a == {"category": "Lipstick", "color": "Red"}
    assert c == {"category": "Other", "color": "Pink"}  # not a class: its 'other'


def test_a_column_the_config_reads_must_be_in_labels_csv(tmp_path):
    rows = "file_name,categry,color,split\nimg/a.jpg,Lipstick,Red,train\n"
    with pytest.raises(SchemaError, match=r"labels.csv: no column 'category' \(the config of"):
        read_samples(folder_config(tmp_path, rows))
    rows = "file_name,category,color\nimg/a.jpg,Lipstick,Red\n"  # no split column
    with pytest.raises(SchemaError, match="no column 'split'"):
        read_samples(folder_config(tmp_path, rows))
    assert read_samples(folder_config(tmp_path, rows, split_by="file_name"))  # no split column


def test_values_that_are_not_classes_are_reported_once_per_file(tmp_path, capsys):
    rows = "file_name,category,color,split\nimg/a.jpg,Blusher,Teal,train\nimg/b.jpg,,Teal,val\n"
    samples = read_samples(folder_config(tmp_path, rows))
    assert [s.labels["color"] for s in samples] == [None, None]
    err = capsys.readouterr().err
    assert "labels.csv: 2 color values are not classes and are left out" in err
    assert "Teal (2)" in err and err.count("warning:") == 1
    assert "note: " in err and "1 category values are not classes and count as 'Other'" in err


def test_a_tags_cell_with_no_known_tag_stays_unlabelled_and_is_reported(tmp_path, capsys):
    schema = [{"name": "tags", "kind": "multi", "classes": ["waterproof", "long_lasting"],
               "sources": {"mine": {"column": "tags", "map": {"SPF": "waterproof"}}}}]  # fmt: skip
    rows = (
        "file_name,tags,split\n"
        "img/a.jpg,waterproof;Long_Lasting,train\n"  # ';'-joined, as predict's CSV writes tags
        "img/b.jpg,glitter,train\n"  # no known tag: not "none of the tags"
        'img/c.jpg,"spf, glitter",train\n'  # a mapped key in another case, and an unknown tag
        "img/d.jpg,,train\n"
        "img/e.jpg,None,train\n"  # none of the tags: labelled, all negative
    )
    cfg = folder_config(tmp_path, rows, schema=schema)
    tags = [s.labels["tags"] for s in read_samples(cfg)]
    assert tags == [["waterproof", "long_lasting"], None, ["waterproof"], None, []]
    assert "2 tags values are not classes" in capsys.readouterr().err


def test_map_keys_match_in_any_letter_case():
    row = {"type": "GLOSS ", "title": "", "tags": ""}
    assert label_from_row(SCHEMA["category"], "shop", row) == "Lip Gloss"  # not its 'other'
    with pytest.raises(SchemaError, match="differ only in letter case"):
        source = {"column": "x", "map": {"k": "a", "K": "b"}}
        parse_schema(
            [{"name": "c", "kind": "single", "classes": ["a", "b"], "sources": {"s": source}}]
        )


def test_a_labels_csv_that_is_not_utf8_is_an_error_naming_the_file(tmp_path):
    rows = "file_name,category,color,split\nimg/a.jpg,Lipstick,Red,train\nimg/b.jpg,Estée,,train\n"
    cfg = folder_config(tmp_path, "")
    (tmp_path / "photos" / "labels.csv").write_bytes(rows.encode("cp1252"))  # Excel's plain CSV
    with pytest.raises(SchemaError, match=r"labels.csv: not UTF-8 text \(byte 0xe9 on line 3\)"):
        read_samples(cfg)


def test_values_sent_to_other_and_rows_of_no_split_are_reported(tmp_path, capsys):
    rows = (
        "file_name,category,color,split\n"
        "img/a.jpg,Lipstik,Red,train\n"  # a typo: goes to Other, and reading says so
        "img/b.jpg,Mascara,Red,trian\n"  # no such split: left out, and reading says so
        "img/c.jpg,Lipstick,Red,\n"
    )
    samples = read_samples(folder_config(tmp_path, rows))
    assert [s.labels["category"] for s in samples] == ["Other"]
    err = capsys.readouterr().err
    assert "note: " in err and "1 category values are not classes and count as 'Other'" in err
    assert "Lipstik (1)" in err
    assert "warning: " in err and "2 rows have a split that is not train / val / test" in err
    assert "trian (1), '' (1)" in err


def test_classes_without_photos_names_each_attributes_missing_classes():
    samples = [
        Sample(Path("a.jpg"), "s", "train", labels={"category": "Lipstick", "tags": ["spf"]}),
        Sample(Path("b.jpg"), "s", "train", labels={"category": None, "tags": None}),
    ]
    missing = classes_without_photos(samples, SCHEMA)
    assert missing == {"category": ["Lip Gloss", "Other"], "finish": ["matte", "gloss"],
                       "tags": ["waterproof"]}  # fmt: skip


def test_files_outside_the_source_folder_are_left_out_and_reported(tmp_path, capsys):
    rows = (
        "file_name,category,color,split\n"
        "img/a.jpg,Lipstick,Red,train\n"
        "../../x.jpg,Lipstick,Red,train\n"
        "/etc/passwd,Lipstick,Red,train\n"
        "img/../../photos/img/b.jpg,Lipstick,Red,val\n"  # out and back in: still out
        "img/../img/c.jpg,Lipstick,Red,val\n"  # stays inside
    )
    samples = read_samples(folder_config(tmp_path, rows))
    assert [s.path.name for s in samples] == ["a.jpg", "c.jpg"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert "labels.csv: 3 files are outside the source's folder and are left out: " in err
    assert "../../x.jpg (1), /etc/passwd (1)" in err


def test_missing_files_are_reported_and_too_many_are_an_error(tmp_path, capsys):
    listed = [f"img/{n}.jpg" for n in "abcde"] + [f"img/gone{i}.jpg" for i in range(12)]
    rows = "file_name,category,color,split\n" + "".join(f"{f},Lipstick,Red,val\n" for f in listed)
    rows += "".join(f"img/{n}.jpg,Lipstick,Red,train\n" for n in "abcde" * 2)
    rows += "img/missing.jpg,Lipstick,Red,train\n"  # 1 of 11 train files: under MAX_MISSING_SHARE
    cfg = folder_config(tmp_path, rows)
    assert len(read_samples(cfg, splits=["train"])) == 11  # still listed: loading reports them
    err = capsys.readouterr().err
    assert err == (
        f"warning: {tmp_path / 'photos' / 'labels.csv'}: 1 listed files are missing "
        "(train: 1 of 11): img/missing.jpg (1)\n"
    )
    assert MAX_MISSING_SHARE == 0.1
    with pytest.raises(SchemaError) as e:  # 12 of 17 val files
        read_samples(cfg)
    assert str(e.value) == (
        f"{tmp_path / 'photos' / 'labels.csv'}: 12 of the 17 files listed for val are missing "
        "(more than 10%): is data.root or the source's path wrong?"
    )
    assert "13 listed files are missing (train: 1 of 11, val: 12 of 17)" in capsys.readouterr().err
