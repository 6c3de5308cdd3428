"""An ImageNet-like JPEG corpus for benchmarks: ImageNet's typical sizes, quality ~90, photo-like detail.

Sizes follow ILSVRC-2012 train: most images are 500 px on the longer side (500×375, 500×333, portrait
too), some smaller, about 4% with a shorter side of 512 or more (the ones a DCT-reduced decode helps).
Content is the demo's scenes drawn at full resolution with fine texture, so that files average
~60–100 KiB like real photographs (decoding cost scales with the entropy-coded bytes).
"""
import multiprocessing
import os

import cv2
import numpy as np

from preprocess import image_ops
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


def imwrite(path, image, params=()):
    """cv2.imwrite through a temporary name (same extension, which picks the format), then renamed: a drawing
    killed half-way leaves no cut file that a later run would take for a finished one."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
    if not cv2.imwrite(tmp, image, list(params)):
        raise OSError(f"{path}: OpenCV could not write it")
    os.replace(tmp, path)


def _draw(job):
    """Image ``i`` of the corpus, from its own seed: the corpus is the same whatever the number of processes."""
    path, seed, i = job
    rng = np.random.default_rng([seed, i])
    w, h = imagenet_size(rng)
    imwrite(path, photo(rng, w, h), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(85, 96))])


def make_corpus(out, n, seed=0, workers=None):
    """Write n JPEGs (quality 85–95) to out/; returns their paths. Reuses the images already there (a larger
    corpus of the same seed holds a smaller one). Drawn on ``workers`` processes (default: every core), so
    the GPU machine's 16 cores draw thousands in seconds."""
    paths = [os.path.join(out, "imgs", f"{i:06d}.jpg") for i in range(n)]
    jobs = [(p, seed, i) for i, p in enumerate(paths) if not os.path.exists(p)]
    if not jobs:
        return paths
    os.makedirs(os.path.join(out, "imgs"), exist_ok=True)
    parallel_map(_draw, jobs, workers)
    return paths


def parallel_map(fn, jobs, workers=None):
    """``fn`` over ``jobs`` on forked processes (one thread of OpenCV each), or in this one for a few jobs."""
    workers = min(workers or len(os.sched_getaffinity(0)), len(jobs))
    if workers <= 1:
        return [fn(j) for j in jobs]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # before the fork: a child must not inherit OpenCV's thread pool (it can hang)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    finally:
        cv2.setNumThreads(threads)


def _square(job):
    src, dst, size = job
    with open(src, "rb") as f:
        square = image_ops.to_square(image_ops.decode(f.read()), size)
    imwrite(dst, square, [cv2.IMWRITE_JPEG_QUALITY, 90])


def squares(sources, out_dir, size=256, workers=None):
    """``sources`` as size×size JPEG files (the builder's rescale and centre crop) in ``out_dir``, named by
    position; returns their paths. Files already there are kept."""
    paths = [os.path.join(out_dir, f"{i:06d}.jpg") for i in range(len(sources))]
    jobs = [(src, dst, size) for src, dst in zip(sources, paths) if not os.path.exists(dst)]
    if jobs:
        os.makedirs(out_dir, exist_ok=True)
        parallel_map(_square, jobs, workers)
    return paths
