"""Reading images and class-index masks, and checking image files cheaply.

Every error is a DataError naming the file. Images always come back as RGB
uint8 HxWx3 whatever the file's mode, turned as viewers show them (EXIF
orientation applied); masks as HxW uint8 class indices.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import DataError

VOID = 255
JPEG_EOI = b"\xff\xd9"
PNG_IEND = b"IEND\xaeB`\x82"
_TAIL_BYTES = 64
_MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B")
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 = as stored, 2..8 = mirrored and/or rotated for display
_SWAPS_AXES = (5, 6, 7, 8)  # transpose, rotate 90, transverse, rotate 270: width and height trade places


# --------------------------------------------------------------------------- conversion
def to_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image of any mode as RGB uint8 HxWx3.

    8-bit modes (L, P, RGBA, LA, CMYK, YCbCr, 1, ...) go through PIL's own
    `convert("RGB")`; 16-bit and 32-bit grey (I;16, I, F), which PIL would
    clip, are rescaled to 0..255 first.
    """
    if im.mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if im.mode.startswith("I") or im.mode == "F":
        grey = _high_depth_to_uint8(np.asarray(im), im.mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _high_depth_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit grey -> /257; 32-bit int: /257 when above 255; float: x255 when in [0, 1]."""
    g = a.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and g.size and g.max() > 255):
        g = g / 257.0
    elif mode == "F" and g.size and g.max() <= 1.0:
        g = g * 255.0
    return np.clip(np.rint(g), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- orientation
def exif_orientation(im: Image.Image) -> int:
    """The EXIF Orientation (1..8) of an opened image, from the metadata read
    with its header (no pixel decoding); 1 when absent, invalid or unreadable.

    `Image.Image.getexif` rather than the PNG plugin's, which decodes the whole
    file to look for an eXIf chunk after the pixel data (the PNG spec puts it
    before, and Pillow writes it there). A corrupt EXIF block is ignored, as
    viewers do."""
    try:
        value = Image.Image.getexif(im).get(ORIENTATION_TAG, 1)
    except Exception:  # any parse error of the metadata block: show the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _file_orientation(path: Path) -> int:
    """`exif_orientation` of an image file (1 if it cannot be opened): for error messages."""
    try:
        with Image.open(path) as im:
            return exif_orientation(im)
    except Exception:
        return 1


# --------------------------------------------------------------------------- reading
def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file as RGB uint8 HxWx3 (DataError naming the file if it cannot).

    The image is returned as viewers show it: an EXIF Orientation other than 1
    (phone photos store 320x213 pixels shown as 213x320) is applied, so that
    masks, which are drawn on the image as displayed, and `wsss predict`
    outputs line up with what users see. Images without it are not copied."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            orientation = exif_orientation(im)
            im.load()
            return to_rgb(ImageOps.exif_transpose(im) if orientation != 1 else im)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except _READ_ERRORS as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a class-index mask PNG (palette or grayscale) as HxW uint8."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return _mask_array(im, path)
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except DataError:
        raise
    except _READ_ERRORS as e:
        raise DataError(f"{path}: unreadable mask ({e})") from None


def _mask_array(im: Image.Image, path: Path) -> np.ndarray:
    """The class indices of an opened mask; rejects colour masks (RGB has no class ids)."""
    if im.mode not in _MASK_MODES:
        raise DataError(
            f"{path}: mask must be a single-channel class-index PNG (palette or grayscale), got mode {im.mode}"
        )
    a = np.array(im)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8)
    if a.size and (a.min() < 0 or a.max() > 255):
        raise DataError(f"{path}: mask values must be in 0..255, found {int(a.min())}..{int(a.max())}")
    return a.astype(np.uint8)


# --------------------------------------------------------------------------- checks
def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """What `path` is when it exists but is not a regular file (after links): a FIFO, a device, a
    socket or a folder, none of which an image or mask can be; None otherwise."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # missing or unreadable: the reader says so
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "not a file")
    return f"is {kind}, not a regular file"


def check_image_file(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as displayed, after checking it is complete.

    Reads the header for the size and the EXIF orientation (width and height
    swapped for orientations 5..8, as `read_image` returns it), then only the
    file tail for JPEG (EOI marker) and PNG (IEND chunk); other formats, and
    files whose tail looks wrong, are fully decoded (PIL raises on truncated
    data).
    """
    special = not_a_regular_file(path)
    if special:  # a FIFO would block the open for ever, a device would be read for ever
        raise DataError(f"{path}: {special}")
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
            if exif_orientation(im) in _SWAPS_AXES:
                size = size[::-1]
    except FileNotFoundError:
        raise DataError(f"{path}: missing image file") from None
    except UnidentifiedImageError:
        fmt = _sniff(path)
        what = f"truncated or corrupt {fmt} file" if fmt else "unreadable image (not a recognised image format)"
        raise DataError(f"{path}: {what}") from None
    except _READ_ERRORS as e:
        raise DataError(f"{path}: unreadable or truncated image ({e})") from None
    if not _tail_ok(path, fmt):
        _full_decode(path, fmt)
    return size


def _sniff(path: Path) -> str | None:
    """"JPEG" / "PNG" when the file starts with that signature (to explain a failed open)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    return "PNG" if head.startswith(b"\x89PNG\r\n\x1a\n") else None


def _tail_ok(path: Path, fmt: str | None) -> bool:
    """True when the last bytes show a complete JPEG / PNG stream."""
    if fmt not in ("JPEG", "PNG", "MPO"):
        return False
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - _TAIL_BYTES))
        tail = fh.read()
    if fmt == "PNG":
        return tail.endswith(PNG_IEND)
    return tail.rstrip(b"\x00").endswith(JPEG_EOI)


def _full_decode(path: Path, fmt: str | None) -> None:
    """Decode the whole file; DataError if it is truncated or corrupt."""
    if fmt in ("JPEG", "PNG", "MPO") and ImageFile.LOAD_TRUNCATED_IMAGES:
        what = "EOI marker FFD9" if fmt != "PNG" else "IEND chunk"
        raise DataError(f"{path}: truncated {fmt} file (no {what} at the end)")
    try:
        with Image.open(path) as im:
            im.load()
    except _READ_ERRORS as e:
        raise DataError(f"{path}: truncated or corrupt {fmt or 'image'} file ({e})") from None


def check_mask_file(path: Path, image_size: tuple[int, int], num_classes: int, image_path: Path) -> np.ndarray:
    """Pixel counts per value (length 256) of a mask, after checking that it
    exists, has the image's size (header only; `image_size` as displayed, from
    `check_image_file`) and only holds class ids below `num_classes` or 255
    (void)."""
    try:
        with Image.open(path) as im:
            if im.size != tuple(image_size):
                w, h = im.size
                raise DataError(
                    f"{path}: mask size {w}x{h} differs from the image size "
                    f"{image_size[0]}x{image_size[1]} of {image_path}{_rotation_hint(im.size, image_size, image_path)}"
                )
            im.load()
            a = _mask_array(im, path)
    except FileNotFoundError:
        raise DataError(f"{path}: missing mask file (for image {image_path})") from None
    except DataError:
        raise
    except _READ_ERRORS as e:
        raise DataError(f"{path}: unreadable or truncated mask ({e})") from None
    counts = np.bincount(a.ravel(), minlength=256)
    bad = np.flatnonzero(counts[num_classes:VOID])
    if bad.size:
        raise DataError(
            f"{path}: class id {num_classes + int(bad[0])} out of range "
            f"(valid: 0..{num_classes - 1}, {VOID} = void)"
        )
    return counts


def _rotation_hint(mask_size: tuple[int, int], image_size: tuple[int, int], image_path: Path) -> str:
    """Why a mask of the image's stored size does not fit: its EXIF orientation turns it for display."""
    if tuple(mask_size) != tuple(image_size)[::-1]:
        return ""
    orientation = _file_orientation(Path(image_path))
    if orientation not in _SWAPS_AXES:
        return ""
    turn = "rotates" if orientation in (6, 8) else "rotates and mirrors"
    return (f" (the image's EXIF orientation {orientation} {turn} it for display; "
            "draw masks on the image as displayed)")


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (n, 3) uint8, class k -> colour k, 255 -> white-ish."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[k] = (r, g, b)
    return pal
