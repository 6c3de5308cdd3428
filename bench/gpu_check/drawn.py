"""A learnable split for train.py, drawn on every core: the demo's ten classes of shapes, square images."""
import os

import cv2
import numpy as np

from bench.corpus import imwrite, parallel_map
from preprocess.make_demo import CLASSES, draw_image


def _draw(job):
    path, cls, size, seed, i = job
    rgb = draw_image(np.random.default_rng([seed, i]), cls, size, size, canvas=size)
    imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # PNG: lossless, the builder encodes


def _folder(root, per_class, size, seed):
    jobs = []
    for ci, cls in enumerate(CLASSES):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for k in range(per_class):
            path = os.path.join(root, cls, f"{k:05d}.png")
            if not os.path.exists(path):
                jobs.append((path, cls, size, seed, ci * per_class + k))
    parallel_map(_draw, jobs)
    return root


def drawn_splits(work, per_class, val_per_class, size):
    """(train, val) packed at ``size``, val with train's classes; reused when already built."""
    from preprocess.build_lmdb import build
    out = []
    for name, n, seed in (("train", per_class, 1), ("val", val_per_class, 2)):
        split = os.path.join(work, f"drawn-{name}-{n}-{size}")
        if not os.path.exists(os.path.join(split, "meta.json")):
            images = _folder(os.path.join(work, f"drawn-images-{name}-{n}-{size}"), n, size, seed)
            build(images, split, size=size, quiet=True, overwrite=True, classes_from=out[0] if out else None)
        out.append(split)
    return tuple(out)
