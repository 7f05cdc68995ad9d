"""Robust image loading and the single preprocessing path.

Training, evaluation, prediction, export and serving all go through :func:`load_image` and
:func:`preprocess`, so a model always sees pixels prepared in exactly the same way.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

# the decoding budget: the most pixels (width * height) a decoder may hold at once, checked
# from the header before decoding. A JPEG decoded at a DCT scale (load_image's min_size)
# holds that scale's pixels, except a progressive or multi-scan one: libjpeg keeps its whole
# coefficient array (2 bytes a component sample), so it counts at full size
MAX_PIXELS: int = 40_000_000
MAX_SIDE: int = 65_535  # no sane photo has a longer side than this
# the largest file read (checked with stat before reading): a 40-megapixel photo stored
# uncompressed as 8-bit RGB is 120 MB
MAX_FILE_BYTES: int = 256 * 1024**2

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_LOADING = threading.Lock()  # a caller's lazily opened PIL image is decoded by one thread


class ImageError(ValueError):
    """An image that cannot be used; str() names the file and the problem."""

    def __init__(self, source: str, problem: str):
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


_NOT_REGULAR = {  # what stat says a path is, when it is neither a file nor a folder
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
# opening never waits (a FIFO with no writer) nor takes a terminal
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


def _check_file(st: os.stat_result, label: str) -> None:
    """Only a regular file of at most MAX_FILE_BYTES is read."""
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(label, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        kind = _NOT_REGULAR.get(stat.S_IFMT(st.st_mode), "an unknown kind of file")
        raise ImageError(label, f"not a regular file ({kind})")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(label, f"file too large ({st.st_size} bytes > {MAX_FILE_BYTES})")


def _read_file(path: str | os.PathLike, label: str) -> bytes:
    """The bytes of a regular file, checked before reading: by stat, before opening it (a
    device may act on being opened), then by fstat, on what was opened (the path may have
    changed in between), and the read stops past the cap (the file may have grown)."""
    _check_file(os.stat(path), label)
    with open(os.open(path, _OPEN_FLAGS | getattr(os, "O_BINARY", 0)), "rb", buffering=0) as f:
        _check_file(os.fstat(f.fileno()), label)
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(label, f"file too large (more than {MAX_FILE_BYTES} bytes)")
    return data


def _read(source: str | os.PathLike | bytes, name: str | None) -> tuple[bytes, str]:
    """Return the raw bytes of `source` and the name error messages use for it."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), name or "<bytes>"
    if not isinstance(source, str | os.PathLike):
        raise ImageError(
            name or f"<{type(source).__name__}>",
            f"expected a file path, bytes or a PIL image, got {type(source).__name__}",
        )
    label = name or str(source)
    try:
        return _read_file(source, label), label
    except ImageError:
        raise
    except FileNotFoundError:
        dangling = os.path.islink(source)
        raise ImageError(
            label, "file not found (a symbolic link to nothing)" if dangling else "file not found"
        ) from None
    except PermissionError:
        raise ImageError(label, "permission denied") from None
    except OSError as e:
        raise ImageError(label, f"unreadable: {e.strerror or e}") from None
    except ValueError as e:  # e.g. an embedded NUL byte in the path
        raise ImageError(label, f"invalid path: {e}") from None


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float greyscale image to 8-bit 'L', or 'LA' where it
    has a transparent value (fully transparent). In float32 and in place: a 36-megapixel
    16-bit PNG of 84 KB took a GB in float64 copies."""
    raw = np.asarray(img)
    arr = np.nan_to_num(raw.astype(np.float32), copy=False)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (0 <= lo and 255 < hi <= 65_535):
        arr /= 257.0  # 16-bit range -> 8-bit
    elif img.mode == "F" and 0 <= lo and hi <= 1.0:
        arr *= 255.0  # unit-range floats
    elif lo < 0 or hi > 255:
        if hi > lo:
            arr -= lo
            arr *= 255.0 / (hi - lo)
        else:
            arr[...] = 0
    grey = np.clip(np.rint(arr, out=arr), 0, 255, out=arr).astype(np.uint8)
    del arr
    transparent = img.info.get("transparency")
    if not isinstance(transparent, int | float):
        return Image.fromarray(grey, "L")
    alpha = np.where(raw == transparent, np.uint8(0), np.uint8(255))  # a PNG's tRNS value
    return Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_8bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        img = canvas
    return img.convert("RGB")


_SEQUENTIAL_SOF = {0xC0, 0xC1, 0xC9}  # baseline, extended and arithmetic sequential frames
_STANDALONE = {0x01, *range(0xD0, 0xDA)}  # markers with no length field (TEM, RSTn, SOI, EOI)


def _decoded_whole(data: bytes) -> bool:
    """Whether libjpeg holds a JPEG's whole coefficient array whatever the scale it decodes
    at: a frame other than a sequential one (progressive, lossless), or a first scan with
    fewer components than the frame (the others follow in later scans). Reads the markers
    up to the first scan the way libjpeg does (bytes between segments skipped); a file
    without one counts as held whole."""
    i, sof, components = 2, 0, 0
    while (i := data.find(b"\xff", i)) >= 0 and i + 4 <= len(data):
        marker = data[i + 1]
        if marker in (0x00, 0xFF) or marker in _STANDALONE:  # a stuffed 0 or fill byte
            i += 1 if marker in (0x00, 0xFF) else 2
            continue
        if marker == 0xDA:  # start of scan: its component count follows the length
            return sof not in _SEQUENTIAL_SOF or i + 4 >= len(data) or data[i + 4] < components
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header
            sof, components = marker, data[i + 9] if i + 9 < len(data) else 0
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return True


def _open(data: bytes, label: str, min_size: int | None) -> Image.Image:
    """Open encoded bytes lazily (header only); raises :class:`ImageError`."""
    if not data:
        raise ImageError(label, "not an image (empty file)")
    try:
        with warnings.catch_warnings():  # load_image's max_pixels is the limit, not Pillow's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                return Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as e:
                if not (min_size and data.startswith(b"\xff\xd8\xff")):
                    raise ImageError(label, f"too many pixels ({e})") from None
                # a JPEG over Pillow's own limit (e.g. a 200-megapixel phone photo) is still
                # decoded at 1/8 scale: its header only, past that check, and ours below
                return JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(label, "not an image (unrecognised format)") from None
    except Exception as e:  # any decoder failure means a bad file
        raise ImageError(label, f"truncated or corrupt image: {e}") from None


def load_image(
    source: str | os.PathLike | bytes | Image.Image,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    min_size: int | None = None,
) -> Image.Image:
    """Open a file path, raw bytes or a PIL image as an RGB PIL image.

    The format is detected from the content, EXIF orientation is applied, transparency is
    composited onto white and animated images give their first frame. With `min_size`, a
    JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) whose
    sides are all still >= `min_size`: far less work for a photo much larger than the model
    input (progressive JPEGs gain least). `max_pixels` bounds the pixels decoded, so such a
    JPEG may be larger (a 48-megapixel photo decodes 0.75 megapixels for a 96 px model). A
    PIL image is used as it is (the frame it is at, any size) and never changed. Any problem
    raises :class:`ImageError` naming the file (`name`, else the path, else ``"<bytes>"`` or
    ``"<PIL image>"``).
    """
    if isinstance(source, Image.Image):  # already opened: the same steps from here on
        img, label, data = source, name or "<PIL image>", b""
        with _LOADING:  # one image loaded from two threads at once reads its file twice
            try:
                img.load()
            except Exception as e:
                raise ImageError(label, f"truncated or corrupt image: {e}") from None
        max_pixels = max(max_pixels, img.width * img.height)  # decoded already: as it is
    else:
        data, label = _read(source, name)
        img = _open(data, label, min_size)

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(label, f"zero-size image ({width} x {height})")
    if max(width, height) > MAX_SIDE:
        raise ImageError(label, f"absurd dimensions ({width} x {height})")
    if min_size and img is not source:  # a caller's own image is not changed
        img.draft(None, (min_size, min_size))  # no-op for formats other than JPEG
    w, h = img.size  # what will be decoded
    if (w, h) != (width, height) and width * height > max_pixels and _decoded_whole(data):
        raise ImageError(
            label,
            f"too many pixels ({width} x {height} > {max_pixels}; a progressive or multi-scan "
            "JPEG is decoded whole at any scale)",
        )
    if w * h > max_pixels:
        scaled = "" if (w, h) == (width, height) else " at the smallest decoding scale"
        raise ImageError(label, f"too many pixels ({w} x {h}{scaled} > {max_pixels})")
    try:
        img.load()  # decode now (first frame of animations) so errors surface here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(label, f"too many pixels ({e})") from None
    except Exception as e:
        raise ImageError(label, f"truncated or corrupt image: {e}") from None

    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # broken EXIF: keep the unrotated image
        pass
    try:
        return _to_rgb(img)
    except Exception as e:
        raise ImageError(label, f"unsupported image mode {img.mode!r}: {e}") from None


def letterbox(img: Image.Image, size: int, fill: int = 255) -> Image.Image:
    """Resize keeping aspect ratio so the longer side is `size`; centre on a square canvas.

    Resampling is bicubic; the canvas colour is ``(fill, fill, fill)``.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    scale = size / max(width, height)
    new_w = min(size, max(1, round(width * scale)))
    new_h = min(size, max(1, round(height * scale)))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixels in 0..255 (uint8 or float, channels at dim -3) -> float32 ``(x/255 - mean)/std``.
    Works on one image (3, H, W) or a batch (B, 3, H, W), on any device."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - m) / s


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 CHW tensor."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB image -> float32 CHW tensor normalised as ``(x / 255 - mean) / std``.

    Same float32 arithmetic as :func:`normalize`, in numpy: one photo is too small for
    torch's thread pool, whose hand-offs cost more than the work in decoding threads."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def preprocess(
    img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Letterbox to `size` then normalise: the single preprocessing function (the image
    comes from ``load_image(source, min_size=size)``)."""
    return to_tensor(letterbox(img, size), mean, std)


def load_for_model(
    source: str | os.PathLike | bytes | Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> tuple[Image.Image, torch.Tensor]:
    """Decode a photo for a model with input `size` -> (RGB image, model input): what
    prediction, serving, export and calibration feed a model. Raises :class:`ImageError`."""
    img = load_image(source, name=name, max_pixels=max_pixels, min_size=size)
    return img, preprocess(img, size, mean, std)
