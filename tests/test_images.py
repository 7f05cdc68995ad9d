"""Tests for beautytag.images: robust loading and the shared preprocessing path."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from beautytag.images import (
    MAX_FILE_BYTES,
    MAX_PIXELS,
    ImageError,
    letterbox,
    load_image,
    normalize,
    preprocess,
    to_tensor,
    to_uint8,
)

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
SRC = Path(__file__).resolve().parents[1] / "src"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _save(img: Image.Image, path: Path, fmt: str, **kwargs) -> Path:
    img.save(path, format=fmt, **kwargs)
    return path


def _chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims any size, with (almost) no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _chunk(b"IEND", b"")
    )


def _probe(path: Path) -> SimpleNamespace:
    """Mode, size and frame count of `path` as plain PIL sees it (checks the fixture)."""
    with Image.open(path) as img:
        return SimpleNamespace(mode=img.mode, size=img.size, n_frames=getattr(img, "n_frames", 1))


def _assert_rgb(img: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == size


# --- ImageError ----------------------------------------------------------------------------


def test_image_error_fields() -> None:
    err = ImageError("a.jpg", "file not found")
    assert isinstance(err, ValueError)
    assert err.source == "a.jpg" and err.problem == "file not found"
    assert str(err) == "a.jpg: file not found"


# --- odd but valid inputs ------------------------------------------------------------------


def test_rgba_transparent_pixels_become_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    out = load_image(_save(img, tmp_path / "a.png", "PNG"))
    _assert_rgb(out, (4, 4))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(126 <= c <= 129 for c in out.getpixel((1, 0)))
    assert out.getpixel((3, 3)) == (255, 0, 0)


def test_la_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("LA", (3, 3), (0, 0))
    out = load_image(_save(img, tmp_path / "la.png", "PNG"))
    assert out.getpixel((1, 1)) == (255, 255, 255)


def test_webp_named_jpg_loads(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    _save(Image.new("RGB", (12, 8), (0, 128, 255)), path, "WEBP", lossless=True)
    assert path.read_bytes()[8:12] == b"WEBP"
    out = load_image(path)
    _assert_rgb(out, (12, 8))
    assert out.getpixel((5, 5)) == (0, 128, 255)


def test_png_named_jpg_loads(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (7, 9), (10, 20, 30)), tmp_path / "p.jpg", "PNG")
    out = load_image(path)
    _assert_rgb(out, (7, 9))
    assert out.getpixel((3, 3)) == (10, 20, 30)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), tmp_path / "c.jpg", "JPEG")
    assert _probe(path).mode == "CMYK"
    out = load_image(path)
    _assert_rgb(out, (10, 10))
    r, g, b = out.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # full magenta + yellow ink is red


def test_greyscale(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("L", (5, 6), 77), tmp_path / "g.png", "PNG"))
    _assert_rgb(out, (5, 6))
    assert out.getpixel((2, 2)) == (77, 77, 77)


def test_one_bit(tmp_path: Path) -> None:
    img = Image.new("1", (8, 8), 0)
    img.putpixel((0, 0), 1)
    out = load_image(_save(img, tmp_path / "b.png", "PNG"))
    _assert_rgb(out, (8, 8))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((4, 4)) == (0, 0, 0)


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black, index 1 blue
    img.putpixel((0, 0), 0)
    path = _save(img, tmp_path / "p.png", "PNG", transparency=0)
    assert _probe(path).mode == "P"
    out = load_image(path)
    _assert_rgb(out, (4, 4))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent index -> white
    assert out.getpixel((2, 2)) == (0, 0, 255)


def test_palette_gif_and_animated_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), c).convert("P") for c in [(255, 0, 0), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert _probe(path).n_frames == 2
    out = load_image(path)
    _assert_rgb(out, (6, 6))
    assert out.getpixel((3, 3)) == (255, 0, 0)


def test_sixteen_bit_png(tmp_path: Path) -> None:
    arr = np.array([[0, 65535], [32896, 257 * 10]], dtype=np.uint16)
    img = Image.fromarray(arr)
    path = _save(img, tmp_path / "deep.png", "PNG")
    assert _probe(path).mode.startswith("I")
    out = load_image(path)
    _assert_rgb(out, (2, 2))
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)
    assert out.getpixel((0, 1)) == (128, 128, 128)
    assert out.getpixel((1, 1)) == (10, 10, 10)


def test_sixteen_bit_grey_png_transparent_value_is_white(tmp_path: Path) -> None:
    arr = np.full((2, 2), 40000, np.uint16)
    arr[0, 0] = 0
    path = _save(Image.fromarray(arr), tmp_path / "deep.png", "PNG", transparency=0)
    assert _probe(path).mode.startswith("I")
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent, as for 8-bit greyscale
    assert out.getpixel((1, 1)) == (156, 156, 156)


def test_a_pil_image_is_used_as_the_same_file_would_be(tmp_path: Path) -> None:
    img = Image.new("RGBA", (30, 20), (200, 30, 60, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))
    path = _save(img, tmp_path / "a.png", "PNG")
    opened = Image.open(path)
    out = load_image(opened, min_size=8)
    assert np.array_equal(np.asarray(out), np.asarray(load_image(path, min_size=8)))
    assert out.getpixel((0, 0)) == (255, 255, 255) and opened.mode == "RGBA"  # theirs unchanged
    with pytest.raises(ImageError, match=r"^<PIL image>: zero-size"):
        load_image(Image.new("RGB", (0, 5)))


def test_an_item_that_is_no_path_or_a_name_the_os_refuses_is_an_image_error(tmp_path) -> None:
    with pytest.raises(ImageError, match=r"^<ndarray>: expected a file path, bytes or a PIL"):
        load_image(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageError, match=r"^x: expected a file path, bytes or a PIL image, got"):
        load_image(12, name="x")
    long_name = tmp_path / ("x" * 300 + ".jpg")  # over the file system's 255 bytes
    with pytest.raises(ImageError, match="unreadable: File name too long"):
        load_image(long_name)
    with pytest.raises(ImageError, match=r"a: is a directory$"):
        load_image(tmp_path, name="a")


def test_float_tiff(tmp_path: Path) -> None:
    arr = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32)
    path = _save(Image.fromarray(arr, "F"), tmp_path / "f.tif", "TIFF")
    out = load_image(path)
    _assert_rgb(out, (2, 2))
    assert out.getpixel((1, 0)) == (255, 255, 255)
    assert out.getpixel((0, 1))[0] in (127, 128)


def test_int32_tiff_out_of_range(tmp_path: Path) -> None:
    arr = np.array([[-1000, 1000]], dtype=np.int32)
    path = _save(Image.fromarray(arr, "I"), tmp_path / "i.tif", "TIFF")
    out = load_image(path)
    _assert_rgb(out, (2, 1))
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10), (0, 200, 0))
    img.paste((255, 0, 0), (0, 0, 6, 4))  # a red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(img, tmp_path / "o.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    assert _probe(path).size == (20, 10)
    out = load_image(path)
    _assert_rgb(out, (10, 20))
    # turned clockwise, the stored top-left corner is shown top right (JPEG: about red)
    red, green = out.getpixel((8, 1)), out.getpixel((1, 1))
    assert red[0] > 200 and red[1] < 60 and green[1] > 150 and green[0] < 60


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_falls_back(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10), (0, 0, 200))
    path = _save(img, tmp_path / "e.jpg", "JPEG", exif=b"Exif\x00\x00MM\x00*garbage\xff\xff")
    out = load_image(path)
    _assert_rgb(out, (20, 10))


def test_exif_transpose_failure_falls_back(tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise SyntaxError("bad EXIF")

    monkeypatch.setattr("beautytag.images.ImageOps.exif_transpose", broken)
    exif = Image.Exif()
    exif[0x0112] = 6
    img = Image.new("RGB", (20, 10), (0, 0, 200))
    out = load_image(_save(img, tmp_path / "e.jpg", "JPEG", exif=exif.tobytes()))
    _assert_rgb(out, (20, 10))


def test_invalid_orientation_value(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 42
    img = Image.new("RGB", (20, 10), (0, 0, 200))
    out = load_image(_save(img, tmp_path / "o.jpg", "JPEG", exif=exif.tobytes()))
    _assert_rgb(out, (20, 10))


def test_bytes_input(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (9, 4), (1, 2, 3)).save(buf, format="PNG")
    out = load_image(buf.getvalue())
    _assert_rgb(out, (9, 4))
    assert out.getpixel((0, 0)) == (1, 2, 3)
    out = load_image(bytearray(buf.getvalue()))
    _assert_rgb(out, (9, 4))


def test_pathlike_and_str(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (3, 3)), tmp_path / "s.png", "PNG")
    _assert_rgb(load_image(str(path)), (3, 3))
    _assert_rgb(load_image(path), (3, 3))


def test_returned_image_is_independent_of_file(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (3, 3), (9, 9, 9)), tmp_path / "d.png", "PNG")
    out = load_image(path)
    path.unlink()
    assert out.getpixel((1, 1)) == (9, 9, 9)


# --- bad inputs ----------------------------------------------------------------------------


def _error(source, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)
    return info.value


def test_truncated_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))
    data = io.BytesIO()
    noise.save(data, format="JPEG", quality=95)
    path = tmp_path / "cut_in_half.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    err = _error(path)
    assert "cut_in_half.jpg" in str(err)
    assert "truncated or corrupt" in err.problem


def test_corrupt_png_data(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (50, 50), (5, 5, 5)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 4 : idat + 20] = b"\x00" * 16  # smash the compressed stream
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    err = _error(path)
    assert "bad.png" in str(err) and "truncated or corrupt" in err.problem


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    err = _error(path)
    assert err.source == str(path)
    assert "not an image" in err.problem


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    assert "not an image (unrecognised format)" in str(_error(path))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    err = _error(path)
    assert "empty.jpg" in str(err) and "not an image" in err.problem
    assert "not an image" in _error(b"").problem


def test_missing_file(tmp_path: Path) -> None:
    err = _error(tmp_path / "nope.jpg")
    assert err.problem == "file not found"
    assert "nope.jpg" in str(err)


def test_invalid_path() -> None:
    assert "invalid path" in _error("bad\x00name.jpg").problem


def test_directory(tmp_path: Path) -> None:
    err = _error(tmp_path)
    assert err.problem == "is a directory"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer: a FIFO named like a photo hung a run
    for ever. (Should it block, a helper thread writes nothing and closes, after 5 s.)"""
    fifo = tmp_path / "p.jpg"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock() -> None:  # opens the writing end once a reader waits in open()
        deadline = time.monotonic() + 5
        while not done.wait(0.05) and time.monotonic() < deadline:
            pass
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader yet
                time.sleep(0.05)

    threading.Thread(target=unblock, daemon=True).start()
    start = time.monotonic()
    try:
        err = _error(fifo)
    finally:
        done.set()
    assert str(err) == f"{fifo}: not a regular file (a FIFO)"
    assert time.monotonic() - start < 2


def test_devices_and_sockets_are_refused(tmp_path: Path) -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    assert str(_error("/dev/zero")) == "/dev/zero: not a regular file (a character device)"
    if hasattr(socket, "AF_UNIX"):
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(tmp_path / "s.jpg"))
            assert _error(tmp_path / "s.jpg").problem == "not a regular file (a socket)"


def test_a_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A 6 GB file named .tif was read whole into memory (a MemoryError, or all the RAM);
    its size is checked first. (The file is sparse: it takes no disk space.)"""
    huge = tmp_path / "huge.tif"
    with huge.open("wb") as f:
        f.truncate(6 * 1024**3)
    err = _error(huge)
    assert str(err) == f"{huge}: file too large ({6 * 1024**3} bytes > {MAX_FILE_BYTES})"
    assert MAX_FILE_BYTES < 6 * 1024**3


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_a_dangling_symlink_says_so(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").symlink_to(tmp_path / "gone.jpg")
    assert _error(tmp_path / "a.jpg").problem == "file not found (a symbolic link to nothing)"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "locked.png", "PNG")
    path.chmod(0)
    try:
        assert "locked.png" in str(_error(path))
    finally:
        path.chmod(0o644)


def test_decompression_bomb_real_image(tmp_path: Path) -> None:
    path = _save(Image.new("L", (3000, 3000)), tmp_path / "big.png", "PNG")
    err = _error(path, max_pixels=1_000_000)
    assert "too many pixels" in err.problem
    assert "3000 x 3000" in err.problem and "1000000" in err.problem
    _assert_rgb(load_image(path), (3000, 3000))  # fine under the default limit


def test_decompression_bomb_header_only() -> None:
    header = _png_header(30_000, 30_000)  # 900 Mpx claimed, no data: must not decode
    err = _error(header, name="bomb.png")
    assert str(err).startswith("bomb.png: ")
    assert "too many pixels" in err.problem
    err = _error(_png_header(8_000, 6_000))
    assert "too many pixels" in err.problem and str(MAX_PIXELS) in err.problem


def test_pixel_limit_counts_the_pixels_a_jpeg_is_decoded_at(tmp_path: Path) -> None:
    """With min_size a large JPEG is decoded at a DCT scale (1/2 .. 1/8): the limit bounds
    those pixels, so a 48-megapixel product photo is fine for a 96 px model."""
    big = Image.new("RGB", (2000, 2000), (200, 120, 90))
    jpeg = _save(big, tmp_path / "big.jpg", "JPEG")
    img = load_image(jpeg, min_size=96, max_pixels=1_000_000)  # decoded at 1/8: 250 x 250
    _assert_rgb(img, (250, 250))
    assert "2000 x 2000 > 1000000" in _error(jpeg, max_pixels=1_000_000).problem  # full size
    err = _error(jpeg, min_size=800, max_pixels=500_000)  # 1/2: 1000 x 1000 still too many
    assert err.problem == "too many pixels (1000 x 1000 at the smallest decoding scale > 500000)"
    png = _save(big, tmp_path / "big.png", "PNG")  # no scaled decoding for other formats
    assert "too many pixels" in _error(png, min_size=96, max_pixels=1_000_000).problem


def _crafted_jpeg(width: int, height: int, progressive: bool = True, scans: int = 0) -> bytes:
    """A 16 x 16 JPEG whose frame header (SOF0 or SOF2) claims `width` x `height`; with
    `scans`, its first scan holds that many of the 3 components (the rest would follow in
    later scans, as libjpeg allows in a sequential JPEG)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 50, 50)).save(buf, "JPEG", progressive=progressive)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    if scans:
        sos = data.index(b"\xff\xda")
        length = struct.unpack_from(">H", data, sos + 2)[0]
        head = struct.pack(">BBH", 0xFF, 0xDA, 6 + 2 * scans) + bytes([scans])
        head += bytes(data[sos + 5 : sos + 5 + 2 * scans]) + b"\x00\x3f\x00"
        data[sos : sos + 2 + length] = head
    return bytes(data)


def test_a_progressive_jpeg_counts_its_full_size_whatever_the_scale() -> None:
    """libjpeg holds the whole coefficient array of a progressive JPEG (2 bytes a
    component sample) whatever the scale it decodes at: a 521-byte file claiming 40000 x
    40000 passed the pixel limit at 1/8 scale and took 5 GB. It is refused from its header,
    as is a sequential one whose first scan holds only some components (several scans)."""
    for data in (_crafted_jpeg(40_000, 40_000), _crafted_jpeg(40_000, 40_000, False, scans=1)):
        err = _error(data, name="bomb.jpg", min_size=96)
        assert str(err) == (
            "bomb.jpg: too many pixels (40000 x 40000 > 40000000; a progressive or "
            "multi-scan JPEG is decoded whole at any scale)"
        )
    img = Image.new("RGB", (2000, 2000), (200, 120, 90))
    buf = io.BytesIO()
    img.save(buf, "JPEG", progressive=True)
    _assert_rgb(load_image(buf.getvalue(), min_size=96, max_pixels=4_000_000), (250, 250))
    assert (
        "2000 x 2000 > 1000000; a progressive"
        in _error(buf.getvalue(), min_size=96, max_pixels=1_000_000).problem
    )
    # a big baseline JPEG is still decoded at 1/8 scale (a 200-megapixel photo's size; libjpeg
    # fills what the file lacks)
    _assert_rgb(load_image(_crafted_jpeg(16_320, 12_240, False), min_size=96), (2040, 1530))


def _load_in_a_fresh_process(path: Path) -> dict:
    """load_for_model(path) in a new Python, with address space for 2 GiB more than it has
    at the start: the error (None if it loaded), the seconds, and how far it raised the
    process's peak memory (KiB)."""
    code = """
import json, os, resource, sys, time
from beautytag.images import ImageError, load_for_model
vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
soft = vm + 2 * 1024**3 if hard == resource.RLIM_INFINITY else min(hard, vm + 2 * 1024**3)
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
try:
    load_for_model(sys.argv[1], 96, (0.5,) * 3, (0.5,) * 3)
    error = None
except ImageError as e:
    error = str(e)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"error": error, "seconds": time.monotonic() - start, "grew_kb": grew}))
"""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="Linux only")
def test_a_crafted_progressive_jpeg_is_refused_fast_and_small(tmp_path: Path) -> None:
    """The same bomb in a fresh process: refused in well under a second, its peak memory
    hardly above the process's start."""
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(_crafted_jpeg(40_000, 40_000))
    out = _load_in_a_fresh_process(bomb)
    assert "too many pixels (40000 x 40000 > 40000000" in out["error"]
    assert out["seconds"] < 1 and out["grew_kb"] < 100 * 1024


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="Linux only")
def test_a_16_bit_png_within_the_budget_decodes_in_little_memory(tmp_path: Path) -> None:
    """A 25-megapixel 16-bit grey PNG (60 KB) is within the pixel budget; scaling it to 8
    bits took 600 MB in float64 copies, now about 310 (float32, in place, no alpha)."""
    deep = _save(Image.fromarray(np.full((5000, 5000), 300, np.uint16)), tmp_path / "d.png", "PNG")
    out = _load_in_a_fresh_process(deep)
    assert out["error"] is None and out["grew_kb"] < 420 * 1024


def test_our_pixel_limit_replaces_pillows_warning(tmp_path: Path, monkeypatch) -> None:
    jpeg = _save(Image.new("RGB", (1200, 1200)), tmp_path / "a.jpg", "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # Pillow would warn at 1.44 Mpx
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_rgb(load_image(jpeg, min_size=96), (150, 150))


def test_a_jpeg_past_pillows_own_limit_is_decoded_at_a_smaller_scale(tmp_path, monkeypatch):
    """Pillow refuses to open an image of more than twice its limit (179 megapixels: a
    200-megapixel phone photo); a JPEG that a DCT scale brings under ours is still read."""
    jpeg = _save(Image.new("RGB", (1200, 1200), (30, 60, 200)), tmp_path / "a.jpg", "JPEG")
    png = _save(Image.new("RGB", (1200, 1200)), tmp_path / "a.png", "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400_000)  # refuses above 0.8 Mpx
    _assert_rgb(load_image(jpeg, min_size=96), (150, 150))
    assert "too many pixels" in _error(jpeg).problem  # full size: refused
    assert "too many pixels" in _error(png, min_size=96).problem  # no DCT scaling for PNG


def test_absurd_dimensions() -> None:
    err = _error(_png_header(100_000, 1), max_pixels=10**12)
    assert "absurd" in err.problem


def test_zero_size() -> None:
    err = _error(_png_header(0, 10))
    assert err.source == "<bytes>"
    assert "zero-size" in err.problem or "not an image" in err.problem


def test_name_overrides_path(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("hello")
    err = _error(path, name="upload #3")
    assert str(err).startswith("upload #3: ")


# --- letterbox / to_tensor / preprocess ----------------------------------------------------


def test_letterbox_portrait() -> None:
    colour = (200, 30, 40)
    out = letterbox(Image.new("RGB", (60, 80), colour), 128)
    assert out.mode == "RGB" and out.size == (128, 128)
    # scaled to 96x128: 16-pixel white bars on the left and right
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((15, 64)) == (255, 255, 255)
    assert out.getpixel((127, 127)) == (255, 255, 255)
    assert out.getpixel((112, 64)) == (255, 255, 255)
    assert out.getpixel((64, 64)) == colour
    assert out.getpixel((20, 0)) == colour  # content touches top and bottom
    assert out.getpixel((107, 127)) == colour


def test_letterbox_landscape_fill_and_upscale() -> None:
    out = letterbox(Image.new("RGB", (10, 5), (0, 0, 0)), 40, fill=0)
    assert out.size == (40, 40)
    assert out.getpixel((0, 0)) == (0, 0, 0)
    out = letterbox(Image.new("RGB", (10, 5), (50, 50, 50)), 40)
    assert out.getpixel((20, 5)) == (255, 255, 255)  # bar above the 40x20 content
    assert out.getpixel((20, 20)) == (50, 50, 50)


def test_letterbox_extreme_aspect() -> None:
    out = letterbox(Image.new("RGB", (1000, 1), (9, 9, 9)), 32)
    assert out.size == (32, 32)


def test_to_tensor_values() -> None:
    img = Image.new("RGB", (3, 2), (0, 255, 51))
    t = to_tensor(img, (0.0, 0.5, 0.1), (1.0, 0.5, 0.2))
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.zeros(2, 3))
    assert torch.allclose(t[1], torch.ones(2, 3))
    assert torch.allclose(t[2], torch.full((2, 3), 0.5))
    assert t.is_contiguous()


def test_to_tensor_layout_is_chw() -> None:
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((3, 1), (255, 0, 0))  # x=3, y=1
    t = to_tensor(img, (0, 0, 0), (1, 1, 1))
    assert t[0, 1, 3] == 1.0 and t.sum() == 1.0


def test_to_tensor_equals_batched_normalize() -> None:
    """Prediction normalises one photo in numpy, training a uint8 batch in torch: same bits."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8))
    for mean, std in ((MEAN, STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))):
        batch = normalize(to_uint8(img)[None], mean, std)
        assert torch.equal(to_tensor(img, mean, std), batch[0])


def test_to_tensor_rejects_bad_stats() -> None:
    with pytest.raises(ValueError):
        to_tensor(Image.new("RGB", (2, 2)), (0.5,), (0.5,))


def test_preprocess_shape_and_white() -> None:
    t = preprocess(Image.new("RGB", (30, 50), (255, 255, 255)), 64, MEAN, STD)
    assert t.shape == (3, 64, 64) and t.dtype == torch.float32
    expected = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(t[:, 0, 0], expected)
    assert torch.allclose(t[:, 32, 32], expected)


def test_preprocess_equals_letterbox_then_to_tensor() -> None:
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (37, 91, 3), dtype=np.uint8))
    a = preprocess(img, 48, MEAN, STD)
    b = to_tensor(letterbox(img, 48), MEAN, STD)
    assert torch.equal(a, b)


# --- real data -----------------------------------------------------------------------------


def test_loads_beauty_shades_dataset() -> None:
    root = DATASETS / "beauty-shades"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"dataset not available at {root}")
    with open(root / "labels.csv", newline="", encoding="utf-8") as f:
        files = [row["file_name"] for row in csv.DictReader(f)]
    ok, bad = 0, []
    for file_name in files:
        try:
            img = load_image(root / file_name, name=file_name)
        except ImageError as e:
            assert file_name in str(e)
            bad.append(str(e))
            continue
        assert img.mode == "RGB" and min(img.size) > 0
        ok += 1
    assert ok + len(bad) == len(files)
    assert ok >= 300, f"only {ok} of {len(files)} loaded; failures: {bad[:5]}"


def test_min_size_decodes_large_jpeg_at_reduced_scale(tmp_path: Path) -> None:
    """DCT-scaled decoding: smaller image, every side still >= min_size, same colours."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)  # smooth blocks of colour
    big = Image.fromarray(base).resize((1200, 900), Image.Resampling.NEAREST)
    p = tmp_path / "big.jpg"
    big.save(p, quality=95)
    full, small = load_image(p), load_image(p, min_size=128)
    assert full.size == (1200, 900)
    assert small.size == (300, 225)  # 1/4: 1/8 would make the short side 113 < 128
    assert min(load_image(p, min_size=300).size) >= 300
    a = np.asarray(letterbox(full, 64), dtype=float)
    b = np.asarray(letterbox(small, 64), dtype=float)
    assert np.abs(a - b).mean() < 4  # same picture after the model's letterbox


def test_min_size_leaves_png_and_small_jpeg_alone(tmp_path: Path) -> None:
    img = Image.new("RGB", (400, 300), (10, 200, 30))
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "a.jpg")
    assert load_image(tmp_path / "a.png", min_size=64).size == (400, 300)
    assert load_image(tmp_path / "a.jpg", min_size=250).size == (400, 300)  # 1/2 would be 150
