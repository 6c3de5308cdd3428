"""Write the seeded demo data set: ``python -m preprocess.make_demo OUT`` -> ``OUT/train/CLASS/…``, ``OUT/val/CLASS/…``.

Ten classes of procedurally drawn, photograph-like scenes: one large shape per image (circle, square,
triangle, ring, cross, star, diamond, and discs of horizontal stripes, vertical stripes or checks) over a
shaded, textured background with clutter, in varied sizes, positions and colours. Colours are drawn
from the same distribution for every class, so the mean colour says nothing about the class (the shape
differs from its surroundings in brightness, as an object in a photograph does); every
shape is mirror-symmetric, so a horizontal flip keeps the class. Mostly JPEG, some PNG, and in train a
few odd files the builder must handle: grayscale, CMYK, PNG with alpha, 16-bit PNG, a PNG named
.JPEG, and one corrupt JPEG. Nothing is downloaded.
"""
import argparse
import io
import os
import sys

import cv2
import numpy as np
from PIL import Image

from datasets import cli

CLASSES = ("checks", "circle", "cross", "diamond", "hstripes", "ring", "square", "star", "triangle", "vstripes")


def _colour(rng):
    return rng.integers(0, 256, 3).astype(np.float32)


def _luma(c):
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _contrasting(rng, against, min_luma=80.0):
    """A random colour whose brightness differs from ``against`` by at least ``min_luma`` (edges a
    photograph would show, whatever the hues)."""
    for _ in range(200):
        c = _colour(rng)
        if abs(_luma(c) - _luma(against)) >= min_luma:
            return c
    return np.where(_luma(against) > 127, 0.0, 255.0).astype(np.float32) * np.ones(3, np.float32)


def shape_mask(cls, h, w, cx, cy, r, rng):
    """float32 H×W mask of the class's shape centred at (cx, cy) with radius r; mirror-symmetric about x=cx."""
    m = np.zeros((h, w), np.uint8)
    c = (int(cx), int(cy))
    if cls == "circle":
        cv2.circle(m, c, int(r), 255, -1, cv2.LINE_AA)
    elif cls == "ring":
        cv2.circle(m, c, int(r), 255, max(2, int(r * 0.35)), cv2.LINE_AA)
    elif cls == "square":
        s = int(r * 0.85)
        cv2.rectangle(m, (c[0] - s, c[1] - s), (c[0] + s, c[1] + s), 255, -1)
    elif cls == "cross":
        a, b = int(r), max(2, int(r * 0.3))
        cv2.rectangle(m, (c[0] - a, c[1] - b), (c[0] + a, c[1] + b), 255, -1)
        cv2.rectangle(m, (c[0] - b, c[1] - a), (c[0] + b, c[1] + a), 255, -1)
    else:
        if cls in ("diamond", "triangle", "star"):
            n, inner = {"diamond": (4, None), "triangle": (3, None), "star": (5, 0.45)}[cls]
            angles = -np.pi / 2 + np.arange(n) * 2 * np.pi / n
            pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
            if inner:
                mid = angles + np.pi / n
                pts = [p for pair in zip(pts, [(cx + inner * r * np.cos(a), cy + inner * r * np.sin(a))
                                                for a in mid]) for p in pair]
            cv2.fillPoly(m, [np.round(np.array(pts) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        else:  # a disc of stripes or checks
            disc = np.zeros_like(m)
            cv2.circle(disc, c, int(r), 255, -1, cv2.LINE_AA)
            period = max(4, int(r / rng.uniform(2.0, 3.5)))
            yy, xx = np.mgrid[:h, :w]
            rows = ((yy - cy + 10 * period) // period) % 2 == 0
            cols = ((np.abs(xx - cx) + period // 2) // period) % 2 == 0  # symmetric about cx
            pattern = {"hstripes": rows, "vstripes": cols, "checks": rows ^ cols}[cls]
            m = (disc * pattern).astype(np.uint8)
    return m.astype(np.float32) / 255.0


def draw_image(rng, cls, w, h, canvas=256):
    """One RGB uint8 H×W×3 scene with a ``cls`` shape: shaded background, texture, clutter, lighting, grain.

    The scene is drawn with its shorter side at most ``canvas`` pixels and enlarged to W×H before the
    grain is added, which keeps large images cheap to make (and soft, like a downscaled photograph)."""
    scale = min(1.0, canvas / min(w, h))
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    c0, c1 = _colour(rng), _colour(rng)
    t = np.linspace(0, 1, 64, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + (t[None, :] - 0.5) * np.cos(angle) + (t[:, None] - 0.5) * np.sin(angle), 0, 1)
    img = cv2.resize(c0 + ramp[..., None] * (c1 - c0), (cw, ch), interpolation=cv2.INTER_LINEAR)
    img += cv2.resize(rng.normal(0, 18, (max(2, ch // 24), max(2, cw // 24), 3)).astype(np.float32), (cw, ch),
                      interpolation=cv2.INTER_CUBIC)
    shorter = min(cw, ch)
    for _ in range(rng.integers(4, 12)):  # clutter: small strokes and dots
        colour = tuple(float(v) for v in _colour(rng))
        p = (int(rng.integers(0, cw)), int(rng.integers(0, ch)))
        if rng.random() < 0.5:
            q = (p[0] + int(rng.normal(0, shorter * 0.08)), p[1] + int(rng.normal(0, shorter * 0.08)))
            cv2.line(img, p, q, colour, max(1, shorter // 150), cv2.LINE_AA)
        else:
            cv2.circle(img, p, max(1, int(shorter * rng.uniform(0.005, 0.025))), colour, -1, cv2.LINE_AA)
    r = shorter * rng.uniform(0.2, 0.34)
    cx = cw / 2 + rng.uniform(-0.12, 0.12) * shorter
    cy = ch / 2 + rng.uniform(-0.12, 0.12) * shorter
    mask = shape_mask(cls, ch, cw, cx, cy, r, rng)[..., None]
    fg = _contrasting(rng, img[int(cy), int(cx)])
    shade = cv2.resize(rng.normal(0, 12, (4, 4)).astype(np.float32), (cw, ch), interpolation=cv2.INTER_CUBIC)
    img = img * (1 - mask) + (fg + shade[..., None]) * mask
    img = cv2.GaussianBlur(img * np.float32(rng.uniform(0.75, 1.2)), (0, 0), rng.uniform(0.4, 1.0))
    if (cw, ch) != (w, h):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(rng.uniform(1, 4))
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_size(rng):
    """(w, h): mostly 260–480 px on the shorter side, 12% under 256, 6% 700–1000 (longer side up to 1600)."""
    u = rng.random()
    shorter = int(rng.uniform(48, 250) if u < 0.12 else rng.uniform(700, 1000) if u < 0.18 else rng.uniform(260, 480))
    longer = int(shorter * rng.uniform(1.0, 1.6))
    return (longer, shorter) if rng.random() < 0.7 else (shorter, longer)


def _encode(rgb, kind, rng):
    if kind in ("jpeg", "png"):
        params = [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(75, 96))] if kind == "jpeg" else []
        return cv2.imencode(".jpg" if kind == "jpeg" else ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)[1].tobytes()
    b = io.BytesIO()
    im = Image.fromarray(rgb)
    if kind == "gray":
        im.convert("L").save(b, "JPEG", quality=90)
    elif kind == "cmyk":
        im.convert("CMYK").save(b, "JPEG", quality=90)
    elif kind == "alpha":
        im.putalpha(Image.fromarray(np.full(rgb.shape[:2], 200, np.uint8)))
        im.save(b, "PNG")
    elif kind == "png16":
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
        return buf.tobytes()
    return b.getvalue()


ODD_FILES = (("gray", ".jpg"), ("cmyk", ".jpg"), ("alpha", ".png"), ("png16", ".png"), ("png", ".JPEG"),
             ("corrupt", ".jpg"))


def make_demo(out, *, seed=0, train_per_class=120, val_per_class=30, quiet=False):
    """Write the demo tree; returns the number of files written."""
    rng = np.random.default_rng(seed)
    written = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for ci, cls in enumerate(CLASSES):
            d = os.path.join(out, split, cls)
            os.makedirs(d, exist_ok=True)
            for k in range(per_class):
                w, h = sample_size(rng)
                rgb = draw_image(rng, cls, w, h)
                kind, ext = ("png", ".png") if rng.random() < 0.1 and w * h < 400_000 else ("jpeg", ".jpg")
                if split == "train" and k == 0 and ci < len(ODD_FILES):  # one odd file in each of 6 classes
                    kind, ext = ODD_FILES[ci]
                data = _encode(rgb, "jpeg" if kind == "corrupt" else kind, rng)
                if kind == "corrupt":
                    data = data[: len(data) // 2]
                with open(os.path.join(d, f"{split}_{cls}_{k:04d}{ext}"), "wb") as f:
                    f.write(data)
                written += 1
        if not quiet:
            print(f"{os.path.join(out, split)}: {len(CLASSES) * per_class} images", file=sys.stderr)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m preprocess.make_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output directory (train/ and val/ are written under it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-class", type=int, default=120)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    make_demo(args.out, seed=args.seed, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
              quiet=args.quiet)
    return 0


if __name__ == "__main__":
    cli.run(main)
