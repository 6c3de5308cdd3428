"""Decoding and the paper's rescale + centre crop, against numpy and Pillow computations written here."""
import io
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from preprocess import image_ops
from tests.conftest import ROOT, encode, random_rgb


def rgb_of(bgr):
    return bgr[..., ::-1].astype(np.int64)


def test_exact_integer_shrink_is_the_block_mean(rng):
    """A 2:1 shrink by area averaging is the mean of each 2×2 block: computed here with numpy."""
    rgb = rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)
    out = image_ops.to_square(rgb.copy(), 256, exact=True)
    blocks = rgb.reshape(256, 2, 384, 2, 3).mean(axis=(1, 3))
    expected = blocks[:, 64:320]
    assert out.shape == (256, 256, 3)
    assert np.abs(out - expected).max() <= 0.5 + 1e-9


def test_centre_crop_offsets_by_hand():
    img = np.arange(7 * 10).reshape(7, 10, 1).repeat(3, axis=2).astype(np.uint8)
    out = image_ops.center_crop(img, 4)
    assert out[0, 0, 0] == img[1, 3, 0]  # top = (7-4)//2 = 1, left = (10-4)//2 = 3
    assert out.shape == (4, 4, 3)


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (256, 300), (12, 9), (2400, 60), (60, 2400), (1000, 1000)])
def test_shorter_side_then_square(w, h, rng):
    bgr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    resized = image_ops.resize_shorter(bgr, 256)
    assert min(resized.shape[:2]) == 256
    assert abs(max(resized.shape[:2]) - round(max(w, h) * 256 / min(w, h))) <= 1
    assert image_ops.to_square(bgr, 256).shape == (256, 256, 3)


def test_fast_path_is_close_to_exact(rng):
    """The DCT-reduced decode and the linear shrink move a photo-like image by ~1 level on average."""
    rgb = random_rgb(rng, 1200, 1600, cell=32)
    data = encode(rgb)
    fast = image_ops.to_square(image_ops.decode(data, size=256), 256)
    exact = image_ops.to_square(image_ops.decode(data, size=256, exact=True), 256, exact=True)
    assert np.abs(fast.astype(int) - exact).mean() < 2.0


def test_reduced_decode_is_used_only_when_big_enough(rng):
    big = encode(random_rgb(rng, 600, 800))
    assert image_ops.decode(big, size=256).shape == (300, 400, 3)  # reduced by 2: 300 >= 256
    assert image_ops.decode(big, size=256, exact=True).shape == (600, 800, 3)
    assert image_ops.decode(big, size=301).shape == (600, 800, 3)
    assert image_ops.decode(encode(random_rgb(rng, 2100, 2100)), size=256).shape == (263, 263, 3)  # by 8


def test_exif_orientation_is_applied(rng):
    rgb = random_rgb(rng, 40, 60)
    rgb[:10, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(rgb, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert image_ops.header_size(data) == (40, 60)
    got = image_ops.decode(data, size=40)
    assert got.shape == (60, 40, 3)
    assert np.abs(rgb_of(got) - expected).mean() < 1
    assert image_ops.decode(data, size=10).shape == (15, 10, 3)  # the reduced decode turns it too


def _pil_bytes(img, kind):
    b = io.BytesIO()
    img.save(b, kind)
    return b.getvalue()


@pytest.mark.parametrize("mode,kind", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"),
                                       ("LA", "PNG"), ("RGB", "PNG"), ("RGB", "GIF"), ("RGB", "BMP"),
                                       ("RGB", "WEBP"), ("I;16", "PNG")])
def test_odd_modes_become_8bit_rgb(mode, kind, rng):
    rgb = random_rgb(rng, 30, 40)
    src = Image.fromarray(rgb)
    img = src.convert("L").convert("I;16") if mode == "I;16" else src.convert(mode)
    data = _pil_bytes(img, kind)
    out = image_ops.decode(data, size=16)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int64)
    if mode == "I;16":
        reference = np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)[..., None] >> 8
    tolerance = 6 if mode == "CMYK" else 1
    assert np.abs(rgb_of(out) - reference).mean() <= tolerance


def test_png_named_jpeg_and_sixteen_bit_rgb(rng, tmp_path):
    rgb16 = rng.integers(0, 65536, (9, 12, 3), dtype=np.uint16)
    ok, buf = cv2.imencode(".png", rgb16)
    out = image_ops.decode(buf.tobytes(), size=4)
    assert out.dtype == np.uint8 and np.array_equal(out, (rgb16 >> 8).astype(np.uint8))


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "not an image"),
    (b"\xff\xd8\xff\xe0" + bytes(40), "not an image"),
])
def test_undecodable_inputs_are_skipped_with_a_reason(data, reason):
    with pytest.raises(image_ops.SkipImage) as info:
        image_ops.decode(data)
    assert info.value.reason == reason


def test_truncated_jpeg_is_skipped(rng):
    data = encode(random_rgb(rng, 200, 300))
    with pytest.raises(image_ops.SkipImage, match="truncated JPEG"):
        image_ops.decode(data[: len(data) * 2 // 3])


def test_too_many_pixels_is_skipped_before_decoding(rng):
    data = encode(random_rgb(rng, 100, 120))
    with pytest.raises(image_ops.SkipImage, match="too many pixels.*120x100"):
        image_ops.decode(data, max_pixels=100 * 120 - 1)
    assert image_ops.decode(data, max_pixels=100 * 120).shape == (100, 120, 3)


@pytest.mark.parametrize("shape,size", [((600, 2, 3), 64), ((3, 2000, 3), 64), ((900, 50, 3), 256)])
def test_an_enlarged_strip_is_its_resized_crop_without_the_whole_resize(shape, size):
    """Past 8:1, an enlargement computes only the crop: within one level of resize-then-crop (cv2.resize's own
    fixed-point rounding), everywhere."""
    img = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    h, w = shape[:2]
    new = (size, round(h * size / w)) if w < h else (round(w * size / h), size)
    full = cv2.resize(img, new, interpolation=cv2.INTER_LINEAR)
    top, left = (full.shape[0] - size) // 2, (full.shape[1] - size) // 2
    expected = full[top:top + size, left:left + size].astype(int)
    got = image_ops.to_square(img, size)
    assert got.shape == (size, size, 3) and np.abs(got.astype(int) - expected).max() <= 1


def test_a_169_byte_strip_needs_no_gigabytes(tmp_path):
    """A 1×30000 PNG enlarged to 256 would be 5.9 GB whole; under a 1.5 GB address-space limit it packs."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    cv2.imwrite(str(src / "strip.png"), np.full((30000, 1, 3), 128, np.uint8))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29)); "
            "from preprocess.build_lmdb import build; "
            f"s = build({str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, workers=1, quiet=True); "
            "print(s['written'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "1", proc.stderr[-2000:]
