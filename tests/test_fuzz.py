"""Fuzzing the image loader and the service (issue 38): mutated JPEG, PNG, WebP and GIF
files give a model input or an ImageError, nothing else, and /v1/predict answers them or
refuses them with a 4xx. The property and the mutations live in
benchmarks/fuzz.py, which also runs it longer by hand; here a short run,
BEAUTYTAG_FUZZ_EXAMPLES inputs (200 unless set)."""

import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import given

from .test_benchmarks import load

fuzz = load("fuzz")
EXAMPLES = int(os.environ.get("BEAUTYTAG_FUZZ_EXAMPLES", "200"))


def test_every_seed_file_loads_and_has_size_fields_to_rewrite():
    for name, data in fuzz.SEEDS.items():
        assert fuzz.check(name, data) == "decoded", name
        assert fuzz.size_fields(data), name


@fuzz.fuzz_settings(EXAMPLES)
@given(fuzz.mutated())
def test_mutated_images_load_or_raise_image_error(case):
    fuzz.check(*case)


@pytest.fixture(scope="module")
def service(tiny_model) -> Iterator[TestClient]:
    """The service on the tiny model, as /v1/predict answers clients."""
    from beautytag.runtime.engine import Engine
    from beautytag.serve import ServeSettings, create_app

    with TestClient(create_app(Engine(tiny_model), ServeSettings())) as client:
        yield client


@fuzz.fuzz_settings(max(10, EXAMPLES // 4))
@given(fuzz.mutated())
def test_mutated_images_through_the_service_are_answered_or_a_4xx(service, case):
    """Through /v1/predict (multipart and raw body): an answer with a record, or 413/415/422
    with a one-line detail naming the file (400 for an empty raw body); never a 5xx; peak
    memory bounded."""
    name, data = case
    before = fuzz.peak_mb()
    r = service.post("/v1/predict", files=[("file", (name, data, "application/octet-stream"))])
    raw = service.post(f"/v1/predict?filename={name}", content=data)
    for answer in (r, raw):
        if not data and answer is raw:  # an empty body holds no image at all
            assert answer.status_code == 400
            continue
        assert answer.status_code in (200, 413, 415, 422), (answer.status_code, answer.text)
        if answer.status_code == 200:
            (record,) = answer.json()["results"]
            assert record["file"] == name and (record["attributes"] is None) != (
                record["error"] is None
            )
        else:
            detail = answer.json()["detail"]
            assert detail.startswith(f"{name}: ") and "\n" not in detail
    assert fuzz.peak_mb() - before < fuzz.PEAK_GROWTH_MB
