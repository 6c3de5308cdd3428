"""An ImageNet-like JPEG corpus for benchmarks: ImageNet's typical sizes, quality ~90, photo-like detail.

Sizes follow ILSVRC-2012 train: most images are 500 px on the longer side (500×375, 500×333, portrait
too), some smaller, about 4% with a shorter side of 512 or more (the ones a DCT-reduced decode helps).
Content is the demo's scenes drawn at full resolution with fine texture, so that files average
~60–100 KiB like real photographs (decoding cost scales with the entropy-coded bytes).
"""
import os

import cv2
import numpy as np

from preprocess.make_demo import CLASSES, draw_image


def imagenet_size(rng):
    u = rng.random()
    if u < 0.04:
        shorter = int(rng.uniform(512, 1200))
        w, h = int(shorter * rng.uniform(1.2, 1.5)), shorter
    elif u < 0.60:
        w, h = 500, 375
    elif u < 0.80:
        w, h = 500, 333
    else:
        w = int(rng.uniform(250, 500))
        h = int(w * rng.uniform(0.6, 0.9))
    return (w, h) if rng.random() < 0.8 else (h, w)


def photo(rng, w, h):
    """A demo scene drawn at full resolution plus fine texture and sensor-like grain."""
    img = draw_image(rng, CLASSES[int(rng.integers(len(CLASSES)))], w, h, canvas=min(w, h)).astype(np.float32)
    tex = cv2.GaussianBlur(rng.standard_normal((h, w, 3), dtype=np.float32), (0, 0), 0.8)
    img += tex * np.float32(rng.uniform(18, 30)) + rng.standard_normal((h, w, 1), dtype=np.float32) * 3
    return np.clip(img, 0, 255).astype(np.uint8)


def make_corpus(out, n, seed=0):
    """Write n JPEGs (quality 85–95) to out/; returns their paths. Reuses an existing corpus of the same n."""
    paths = [os.path.join(out, "imgs", f"{i:06d}.jpg") for i in range(n)]
    if all(os.path.exists(p) for p in paths):
        return paths
    os.makedirs(os.path.join(out, "imgs"), exist_ok=True)
    rng = np.random.default_rng(seed)
    for p in paths:
        w, h = imagenet_size(rng)
        bgr = photo(rng, w, h)
        cv2.imwrite(p, bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(85, 96))])
    return paths
