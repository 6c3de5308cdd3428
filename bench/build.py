"""Offline build speed and quality: ``python -m bench.build [--images N] [--repeats R]``.

In one run, on one ImageNet-like corpus (bench/corpus.py):
1. the decode + resize options, one core, each against the exact path (full decode + area resize):
   milliseconds per image and mean absolute pixel difference of the 256×256 result, over all images and
   over the ones large enough for a DCT-reduced decode;
2. whole builds: a plain PIL implementation of the same preprocessing in one process (the baseline) and
   ``python -m preprocess.build_lmdb`` as a command, start-up included, with --workers 1 and all cores.
Repeats are interleaved and the median kept; ratios matter, absolute figures move between runs.
"""
import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
from PIL import Image

from bench.corpus import make_corpus
from preprocess import image_ops
from preprocess.build_lmdb import default_workers

SIZE = 256


def plain_pil(paths, out_dir):
    """The baseline: what a careful script does with Pillow alone, one process."""
    os.makedirs(out_dir, exist_ok=True)
    for k, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = SIZE / min(w, h)
            im = im.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.BILINEAR)  # antialiased
            w, h = im.size
            left, top = (w - SIZE) // 2, (h - SIZE) // 2
            im.crop((left, top, left + SIZE, top + SIZE)).save(os.path.join(out_dir, f"{k}.jpg"), quality=90)


def _cv_decode(data, reduce):
    k = image_ops._reduction(data, min(image_ops.header_size(data)), SIZE, not reduce)
    flag = image_ops._REDUCED[k] if k > 1 else cv2.IMREAD_COLOR
    return cv2.imdecode(np.frombuffer(data, np.uint8), flag)


def _square(img, interp):
    h, w = img.shape[:2]
    s = SIZE / min(h, w)
    img = cv2.resize(img, (max(SIZE, round(w * s)), max(SIZE, round(h * s))), interpolation=interp)
    return image_ops.center_crop(img, SIZE)


def _pil_square(data):
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (SIZE, SIZE))  # Pillow's own DCT-reduced decode
        im = im.convert("RGB")
        w, h = im.size
        s = SIZE / min(w, h)
        im = im.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.BILINEAR)
        return image_ops.center_crop(np.asarray(im)[..., ::-1], SIZE)


OPTIONS = {
    "exact: full decode + INTER_AREA (reference, --exact)":
        lambda d: image_ops.to_square(image_ops.decode(d, size=SIZE, exact=True), SIZE, exact=True),
    "default: DCT-reduced decode + INTER_LINEAR below 2x (the builder)":
        lambda d: image_ops.to_square(image_ops.decode(d, size=SIZE), SIZE),
    "full decode + INTER_LINEAR": lambda d: _square(_cv_decode(d, False), cv2.INTER_LINEAR),
    "DCT-reduced decode + INTER_AREA": lambda d: _square(_cv_decode(d, True), cv2.INTER_AREA),
    "full decode + INTER_CUBIC": lambda d: _square(_cv_decode(d, False), cv2.INTER_CUBIC),
    "Pillow draft + antialiased bilinear": _pil_square,
}


def bench_options(datas, repeats):
    """ms per image (median of repeats) and MAD against the exact path, for all images and the reducible ones."""
    reducible = [i for i, d in enumerate(datas) if min(image_ops.header_size(d)) >= 2 * SIZE]
    reference = [OPTIONS[next(iter(OPTIONS))](d).astype(np.int16) for d in datas]
    times = {name: [] for name in OPTIONS}
    per_image = {name: np.zeros(len(datas)) for name in OPTIONS}
    for _ in range(repeats):
        for name, fn in OPTIONS.items():
            t0 = time.perf_counter()
            for i, d in enumerate(datas):
                t = time.perf_counter()
                fn(d)
                per_image[name][i] += time.perf_counter() - t
            times[name].append((time.perf_counter() - t0) / len(datas))
    rows = []
    for name, fn in OPTIONS.items():
        mad = [np.abs(fn(d).astype(np.int16) - r).mean() for d, r in zip(datas, reference)]
        rows.append({
            "option": name, "ms": 1e3 * statistics.median(times[name]), "mad": float(np.mean(mad)),
            "ms_reducible": 1e3 * per_image[name][reducible].mean() / repeats if reducible else float("nan"),
            "mad_reducible": float(np.mean([mad[i] for i in reducible])) if reducible else float("nan"),
        })
    return rows, len(reducible)


def bench_builds(src, paths, tmp, repeats, workers):
    runs = {"plain PIL, 1 process": [], "build_lmdb --workers 1": [], f"build_lmdb --workers {workers}": []}
    for _ in range(repeats):
        for name in runs:
            out = os.path.join(tmp, "out")
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            if name.startswith("plain"):
                plain_pil(paths, out)
            else:
                subprocess.run([sys.executable, "-m", "preprocess.build_lmdb", src, out, "--quiet", "--format", "list",
                                "--root", os.path.dirname(paths[0]), "--workers", name.rsplit(" ", 1)[1]],
                               check=True)
            runs[name].append(len(paths) / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in runs.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000, help="corpus size for the whole builds")
    p.add_argument("--option-images", type=int, default=1000, help="the first N images time the options")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "alexnet-bench-corpus"))
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    paths = make_corpus(args.dir, args.images)
    listing = os.path.join(args.dir, f"list-{args.images}.txt")
    with open(listing, "w") as f:
        f.writelines(f"{os.path.basename(q)} 0\n" for q in paths)
    datas = [open(q, "rb").read() for q in paths]
    sizes = np.array([image_ops.header_size(d) for d in datas])
    print(f"corpus: {len(paths)} JPEGs, mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f}, "
          f"{np.mean([len(d) for d in datas]) / 1024:.0f} KiB average")

    rows, n_red = bench_options(datas[:args.option_images], args.repeats)
    print(f"\n| decode + resize to {SIZE}x{SIZE}, one core, {min(len(datas), args.option_images)} images | ms/image | MAD vs exact | ms/image, reducible "
          f"({n_red}) | MAD, reducible |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['option']} | {r['ms']:.2f} | {r['mad']:.2f} | {r['ms_reducible']:.2f} | {r['mad_reducible']:.2f} |")

    workers = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        speeds = bench_builds(listing, paths, tmp, args.repeats, workers)
    base = speeds["plain PIL, 1 process"]
    print("\n| whole build (start-up included) | images/s | vs plain PIL |\n|---|---|---|")
    for name, v in speeds.items():
        print(f"| {name} | {v:.0f} | {v / base:.2f}x |")
    one = speeds["build_lmdb --workers 1"]
    print(f"\nall cores ({workers}) / one worker: {speeds[f'build_lmdb --workers {workers}'] / one:.2f}x "
          f"(target >= 1.8x on 2 cores); one worker / plain PIL: {one / base:.2f}x (target >= 1.25x)")


if __name__ == "__main__":
    main()
