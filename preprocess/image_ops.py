"""Decode any image to 8-bit colour and bring it to the paper's square: shorter side to ``size``, centre crop.

Arrays here are OpenCV's BGR order (what ``cv2.imdecode`` returns), to avoid a conversion per image;
``datasets.format.encode_image`` takes RGB, so callers convert once at the end.

Two modes, measured in ``docs/BENCHMARKS.md``:
- exact: full decode, then ``INTER_AREA`` when shrinking (true area averaging, antialiased) and
  ``INTER_LINEAR`` when enlarging. The reference.
- fast (default): a JPEG whose shorter side is at least twice ``size`` is decoded reduced by 2, 4 or 8
  in the DCT domain (libjpeg's scaling, itself an antialiasing filter), which leaves a shrink of less
  than 2; a shrink of less than 2 uses ``INTER_LINEAR`` (its 2-tap support covers the whole source
  footprint, so little aliasing), a larger one (non-JPEG) still ``INTER_AREA``.
"""
import io

import cv2
import numpy as np
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = None  # we check --max-pixels ourselves, before decoding

_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"


class SkipImage(Exception):
    """An input that cannot become a record; ``reason`` is a short category, ``detail`` the specifics."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def header_size(data):
    """(width, height) as displayed (EXIF orientation applied), read from the header alone."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    except Exception as exc:
        raise SkipImage("not an image", f"unrecognised or damaged header ({exc.__class__.__name__})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _reduction(data, shorter, size, exact):
    """The largest libjpeg scale-down 2, 4 or 8 that keeps the shorter side >= size (1: none)."""
    if exact or not data.startswith(_JPEG_SOI):
        return 1
    for k in (8, 4, 2):
        if -(-shorter // k) >= size:  # libjpeg rounds scaled sizes up
            return k
    return 1


def decode(data, *, size=256, exact=False, max_pixels=178_956_970):
    """Bytes of any common image file -> BGR uint8 H×W×3, EXIF-rotated, alpha dropped, 16-bit scaled to 8."""
    if len(data) == 0:
        raise SkipImage("empty file", "0 bytes")
    w, h = header_size(data)
    if w * h > max_pixels:
        raise SkipImage("too many pixels", f"{w}x{h} = {w * h} > --max-pixels {max_pixels}")
    if data.startswith(_JPEG_SOI) and _JPEG_EOI not in data[-64:]:
        raise SkipImage("truncated JPEG", "no end-of-image marker; the file was cut short")
    k = _reduction(data, min(w, h), size, exact)
    buf = np.frombuffer(data, np.uint8)
    try:
        bgr = cv2.imdecode(buf, _REDUCED[k] if k > 1 else cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is None:  # formats OpenCV lacks: let Pillow try
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except Exception as exc:
            raise SkipImage("cannot decode", f"{exc.__class__.__name__}: {exc}") from None
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    return bgr


def resize_shorter(img, size, *, exact=False):
    """Rescale so the shorter side is ``size``, keeping the aspect ratio (longer side rounded)."""
    h, w = img.shape[:2]
    shorter = min(h, w)
    if shorter == size:
        return img
    scale = size / shorter
    if w <= h:
        new_w, new_h = size, max(size, round(h * scale))
    else:
        new_w, new_h = max(size, round(w * scale)), size
    shrink = shorter / size
    area = shrink > 1 and (exact or shrink >= 2)
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA if area else cv2.INTER_LINEAR)


def center_crop(img, size):
    """The central size×size square; an odd margin leaves the extra pixel at the bottom/right."""
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


MAX_ASPECT = 8  # an enlarged image longer than this many times its width is never made whole


def to_square(img, size, *, exact=False):
    """The paper's offline step (Sec. 2): shorter side to ``size``, then the centre ``size``×``size`` crop.

    A strip (say 1×30,000 pixels, 169 bytes as a PNG) would be enlarged whole first: 5.9 GB at size 256.
    Enlarged past an aspect ratio of ``MAX_ASPECT``, only the crop is computed, by the same bilinear map
    (within one level of ``cv2.resize``'s fixed-point rounding); every other image goes through the resize."""
    h, w = img.shape[:2]
    if min(h, w) < size and max(h, w) > MAX_ASPECT * min(h, w):
        return _enlarged_strip(img, size)
    return np.ascontiguousarray(center_crop(resize_shorter(img, size, exact=exact), size))


def _enlarged_strip(img, size):
    """``center_crop(resize_shorter(img, size), size)`` for an enlargement, without the whole resized image:
    each output pixel sampled where ``cv2.resize`` (INTER_LINEAR, pixel centres aligned) would sample it."""
    h, w = img.shape[:2]
    shorter, longer = min(h, w), max(h, w)
    new_long = max(size, round(longer * size / shorter))
    off = (new_long - size) // 2
    r_long, r_short = longer / new_long, shorter / size
    along = [r_long, (off + 0.5) * r_long - 0.5]  # output index -> source coordinate, long axis
    across = [r_short, 0.5 * r_short - 0.5]
    (ax, bx), (ay, by) = (across, along) if h > w else (along, across)
    m = np.array([[ax, 0, bx], [0, ay, by]])
    return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
