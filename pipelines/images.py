"""Opening, checking and converting images for the data stages: the one place a source image is decoded.

A file is opened lazily: its size comes from the header and is checked before any pixel is decoded (a
declared size past Pillow's decompression-bomb limit is refused at open). Two targets:

- ``RGB`` (photographs, renders): 8-bit RGB. The rules are :data:`CONVERSION_RULES`; each conversion
  returns a short note (e.g. ``"I;16->RGB (>>8)"``) so stages can count what they converted.
- ``LABELS`` (segmentations, class-index maps): 8-bit ``L`` or ``P`` kept as stored (for ``P`` the
  palette indices are the classes); 16-bit grey kept when every index is <= 255; anything else is refused.

Errors are :class:`ImageError` with a stable ``reason`` (the codes below).
"""
from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Stable reasons (they appear in reports; do not rename lightly).
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
WRONG_IMAGE_SIZE = "wrong_image_size"
UNSUPPORTED_IMAGE_MODE = "unsupported_image_mode"

RGB, LABELS = "RGB", "L"
#: What :func:`to_rgb` does, for dataset cards.
CONVERSION_RULES = ("16-bit samples become 8-bit by keeping the high byte (value >> 8, not rounded); grey and "
                    "black-and-white are replicated to RGB; palette images take their palette colours; alpha is "
                    "dropped (not composited); CMYK and YCbCr go through Pillow's conversion; float, 32-bit integer "
                    f"and other modes are skipped (`{UNSUPPORTED_IMAGE_MODE}`)")

#: What :func:`to_labels` does, for dataset cards.
LABEL_RULES = ("class-index maps are kept as 8-bit indices (a palette map's indices, not its colours; a 16-bit "
               "map when every index is <= 255); colour, alpha or float maps are skipped")

_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
# modes Pillow converts to RGB correctly, and what the conversion does
_BY_PILLOW = {"L": "grey replicated", "1": "black and white", "P": "palette", "PA": "palette, alpha dropped",
              "LA": "grey replicated, alpha dropped", "RGBA": "alpha dropped", "RGBX": "padding dropped",
              "CMYK": "Pillow's CMYK conversion", "YCbCr": "Pillow's YCbCr conversion"}
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)


class ImageError(Exception):
    """An image that cannot be used; ``reason`` is one of the codes above, ``detail`` names the file."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _raw_mode(im: Image.Image) -> str:
    """The decoder's raw mode of a lazily opened image (e.g. ``RGB;16B`` for a 48-bit PNG), else its mode."""
    if not im.tile:
        return im.mode
    args = im.tile[0][3]
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else im.mode


def _sixteen_bit(im: Image.Image, raw: str) -> bool:
    return im.mode in _SIXTEEN_BIT_GREY or ";16" in raw


def _sixteen_bit_grey(im: Image.Image, raw: str) -> bool:
    """16-bit grey samples in memory (``I;16*``, or ``I`` decoded from 16 bits, as a 16-bit PGM is)."""
    return im.mode in _SIXTEEN_BIT_GREY or (im.mode == "I" and ";16" in raw)


def _stored_as(im: Image.Image, raw: str, target: str) -> bool:
    """Whether ``im`` already is ``target``: 8-bit RGB, or an 8-bit ``L`` / ``P`` class-index map."""
    if target == RGB:
        return im.mode == "RGB" and not _sixteen_bit(im, raw)
    return im.mode == "P" or (im.mode == "L" and raw == "L")


def to_rgb(im: Image.Image, raw: str | None = None) -> tuple[Image.Image, str | None]:
    """``im`` as 8-bit RGB and the conversion applied (``None``: it was 8-bit RGB).

    ``raw`` is the decoder's raw mode captured before ``load()`` (it tells 16-bit sources the decoder
    already reduced, and the bit depth of mode ``I``); without it only the mode is known.
    Raises :class:`ImageError` (``unsupported_image_mode``) for modes with no meaningful conversion.
    """
    raw = raw or im.mode
    if _stored_as(im, raw, RGB):
        return im, None
    if _sixteen_bit_grey(im, raw):
        grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB"), "I;16->RGB (>>8)"
    if im.mode == "RGB":  # a 48-bit PNG: Pillow's decoder keeps the high byte
        return im, "RGB;16->RGB (>>8)"
    bits16 = _sixteen_bit(im, raw)
    how = _BY_PILLOW.get(im.mode)
    if how is None:
        what = {"I": "integer samples wider than 16 bits or of unknown range", "F": "float samples"}.get(
            im.mode, "no defined RGB conversion")
        raise ImageError(UNSUPPORTED_IMAGE_MODE, f"mode {im.mode} ({what})")
    src = f"{im.mode};16" if bits16 else im.mode
    return im.convert("RGB"), f"{src}->RGB ({'>>8, ' if bits16 else ''}{how})"


def to_labels(im: Image.Image, raw: str | None = None) -> tuple[Image.Image, str | None]:
    """``im`` as an 8-bit class-index map (mode ``L`` or ``P``) and the conversion applied (``None``: none).

    Raises :class:`ImageError` (``unsupported_image_mode``) for colour, alpha, float or sub-8-bit grey
    (whose values the decoder rescales), and for 16-bit maps with an index above 255.
    """
    raw = raw or im.mode
    if _stored_as(im, raw, LABELS):
        return im, None
    if _sixteen_bit_grey(im, raw):
        values = np.asarray(im)
        top = int(values.max(initial=0))
        if top > 255:
            raise ImageError(UNSUPPORTED_IMAGE_MODE, f"mode {im.mode} class map with index {top} (> 255)")
        return Image.fromarray(values.astype(np.uint8), mode="L"), "I;16->L (indices kept)"
    raise ImageError(UNSUPPORTED_IMAGE_MODE, f"mode {im.mode} (raw {raw}) is not an 8-bit class-index map")


def _convert(im: Image.Image, target: str, raw: str) -> tuple[Image.Image, str | None]:
    if target not in (RGB, LABELS):
        raise ValueError(f"target must be {RGB!r} or {LABELS!r}, got {target!r}")
    return to_rgb(im, raw) if target == RGB else to_labels(im, raw)


def _open(path: Path, size: tuple[int, int] | None) -> Image.Image:
    """Open lazily (header only) and check the declared size; the caller closes the image."""
    if not path.is_file():
        raise ImageError(MISSING_IMAGE, str(path))
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageError(WRONG_IMAGE_SIZE, f"{path.name}: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(CORRUPT_IMAGE, f"{path.name}: {exc}") from exc
    if size is not None and im.size != tuple(size):
        im.close()
        raise ImageError(WRONG_IMAGE_SIZE, f"{path.name} is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]}")
    return im


def _decoded(im: Image.Image, path: Path, target: str) -> tuple[Image.Image, str | None]:
    raw = _raw_mode(im)  # before load(), which empties the tile list
    try:
        im.load()
    except _DECODE_ERRORS as exc:
        raise ImageError(CORRUPT_IMAGE, f"{path.name}: {exc}") from exc
    try:
        return _convert(im, target, raw)
    except ImageError as exc:
        raise ImageError(exc.reason, f"{path.name}: {exc.detail}") from exc


def read(path: str | Path, size: tuple[int, int] | None = None, target: str = RGB) -> tuple[np.ndarray, str | None]:
    """Decode ``path`` to a uint8 array (``RGB``: HxWx3; ``LABELS``: HxW indices) and the conversion applied.

    ``size`` is the expected (width, height), checked from the header before decoding.
    Raises :class:`ImageError`.
    """
    path = Path(path)
    with _open(path, size) as im:
        out, note = _decoded(im, path, target)
        return np.asarray(out), note


def encode(path: str | Path, size: tuple[int, int] | None = None, target: str = RGB,
           keep_formats: tuple[str, ...] = ("PNG",)) -> tuple[bytes, str | None]:
    """The file's own bytes when it is stored in one of ``keep_formats`` already as ``target``, else the
    converted image as PNG; and the conversion applied (``None``: kept or stored as ``target``).

    A kept PNG is checked by its chunk CRCs (a truncated file fails without a full decode); other kept
    formats are decoded once. Raises :class:`ImageError`.
    """
    path = Path(path)
    with _open(path, size) as im:
        if im.format in keep_formats and _stored_as(im, _raw_mode(im), target):
            data = path.read_bytes()
            try:  # the bytes kept are the bytes checked
                with Image.open(io.BytesIO(data)) as kept:
                    kept.verify() if kept.format == "PNG" else kept.load()
            except _DECODE_ERRORS as exc:
                raise ImageError(CORRUPT_IMAGE, f"{path.name}: {exc}") from exc
            return data, None
        out, note = _decoded(im, path, target)
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        return buf.getvalue(), note


def describe_conversions(counts: dict[str, int] | None, labels: bool = False) -> str:
    """Card text: the conversion rules (with ``labels``, the class-map rules too) and how many images each
    conversion touched (``counts``: note -> images)."""
    done = "; ".join(f"`{k}`: {v}" for k, v in sorted((counts or {}).items()))
    return (f"Images not stored as 8-bit RGB are converted: {CONVERSION_RULES}."
            + (f" Segmentation {LABEL_RULES}." if labels else "")
            + (f" Converted in this build: {done}." if done else " No image needed converting in this build."))
