"""Fuzzing the image loader (issue 38): mutated JPEG, PNG, WebP and GIF files give a model
input or an ImageError, nothing else. The property and the mutations live in
benchmarks/fuzz.py, which also runs it longer by hand; here a short run,
BEAUTYTAG_FUZZ_EXAMPLES inputs (200 unless set)."""

import os

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
