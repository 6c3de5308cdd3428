"""Offline build speed and quality: ``python -m bench.build [--images N] [--repeats R]``.

In one run, on one ImageNet-like corpus (bench/corpus.py):
1. the decode + resize options, one core, each against the exact path (full decode + area resize):
   milliseconds per image and mean absolute pixel difference of the 256×256 result, over all images and
   over the ones large enough for a DCT-reduced decode;
2. whole builds: a plain PIL implementation of the same preprocessing in one process (the baseline) and
   ``python -m preprocess.build_lmdb`` as a command, start-up included, with --workers 1 and all cores.
3. archives (``--sections archives``): the corpus as ImageNet ships it (a tar of per-class tars) against the
   same images as files, both built with all cores; K parts built at once (one worker each) against one build
   with K workers; and ``preprocess.merge``'s time, for JPEG parts and for raw parts ~8x their bytes.
Repeats are interleaved; ratios are per repeat, reported as min/median/max; absolute figures move between runs.
"""
import argparse
import io
import json
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


def archive_corpus(paths, root, classes=10):
    """The corpus as class folders (hard links) and as ILSVRC2012_img_train.tar's layout (GNU tar format, as
    ImageNet's), class c holding images c, c + classes, ...; returns (folder, tar)."""
    import tarfile
    folder, tar = os.path.join(root, "folder"), os.path.join(root, "train.tar")
    shutil.rmtree(folder, ignore_errors=True)
    for i, p in enumerate(paths):
        cls = os.path.join(folder, f"n{i % classes:08d}")
        os.makedirs(cls, exist_ok=True)
        os.link(p, os.path.join(cls, os.path.basename(p)))
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as outer:
        for c in sorted(os.listdir(folder)):
            inner = os.path.join(root, f"{c}.tar")
            with tarfile.open(inner, "w", format=tarfile.GNU_FORMAT) as t:
                for name in sorted(os.listdir(os.path.join(folder, c))):
                    t.add(os.path.join(folder, c, name), arcname=name)
            outer.add(inner, arcname=f"{c}.tar")
            os.remove(inner)
    return folder, tar


def drop_caches():
    """Empty the page cache (root on Linux), so a build reads from the disk as on first contact; False where
    not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def _build(src, out, *args):
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "preprocess.build_lmdb", src, out, "--quiet", *map(str, args)], check=True)


def _merge(out, parts):
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "preprocess.merge", out, *parts, "--quiet"], check=True)
    return time.perf_counter() - t0


def _spread(values):
    return "{:.2f} / {:.2f} / {:.2f}".format(min(values), statistics.median(values), max(values))


def read_stage(src, cold):
    """The reading stage alone, one process: (list seconds, read seconds) for every input's bytes, in the
    builder's shuffled order."""
    from preprocess.sources import open_source
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    source = open_source(src, workers=1)
    t1 = time.perf_counter()
    order = np.random.default_rng(0).permutation(len(source)).tolist()
    for a in range(0, len(order), 32):
        for data in source.load(order[a:a + 32]):
            assert isinstance(data, bytes)
    return t1 - t0, time.perf_counter() - t1


def bench_archives(paths, tmp, repeats, workers):
    """Tar against files, K parts against one build, and the merge; ratios per repeat."""
    folder, tar = archive_corpus(paths, tmp)
    n = len(paths)
    cold = drop_caches()
    stage = {}
    for _ in range(repeats):
        for kind in ("warm", "cold") if cold else ("warm",):
            for name, src in (("files", folder), ("tar", tar)):
                read_stage(src, False)  # warm: the input in the page cache
                stage.setdefault((kind, name), []).append(read_stage(src, kind == "cold"))
    print(f"\n| reading stage alone, {n} images, one process, {repeats} repeats | list, ms | read, µs/image | "
          "list + read, s | files / tar, list + read |\n|---|---|---|---|---|")
    for (kind, name), v in stage.items():
        ratio = [(f[0] + f[1]) / (t[0] + t[1]) for f, t in zip(stage[(kind, "files")], stage[(kind, "tar")])]
        print(f"| {name}, {'input in the page cache' if kind == 'warm' else 'page cache dropped'} | "
              f"{_spread([1e3 * a for a, _ in v])} | {_spread([1e6 * b / n for _, b in v])} | "
              f"{_spread([a + b for a, b in v])} | {_spread(ratio) if name == 'tar' else ''} |")
    rows = {"files": [], "tar": [], "cold files": [], "cold tar": [], "one": [], "parts": [], "parts+merge": [],
            "merge": [], "merge_raw": []}
    for _ in range(repeats):
        kinds = (("files", folder), ("tar", tar)) + ((("cold files", folder), ("cold tar", tar)) if cold else ())
        for name, src in kinds:
            out = os.path.join(tmp, name)
            if name.startswith("cold"):
                shutil.rmtree(out, ignore_errors=True)
                drop_caches()
            else:
                _build(src, out, "--workers", workers)  # the input in the page cache
            t0 = time.perf_counter()
            _build(src, out, "--workers", workers)
            rows[name].append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        _build(tar, os.path.join(tmp, "one"), "--workers", workers)
        rows["one"].append(time.perf_counter() - t0)
        parts = [os.path.join(tmp, f"part{i}") for i in range(workers)]
        for p in parts:
            shutil.rmtree(p, ignore_errors=True)
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "preprocess.build_lmdb", tar, p, "--quiet", "--workers", "1",
                                   "--part", str(i), "--parts", str(workers)]) for i, p in enumerate(parts)]
        assert all(proc.wait() == 0 for proc in procs)
        rows["parts"].append(time.perf_counter() - t0)
        rows["merge"].append(_merge(os.path.join(tmp, "merged"), parts))
        rows["parts+merge"].append(rows["parts"][-1] + rows["merge"][-1])
    raw_parts = [os.path.join(tmp, f"raw{i}") for i in range(workers)]
    for i, p in enumerate(raw_parts):
        _build(tar, p, "--workers", workers, "--encoding", "raw", "--part", i, "--parts", workers)
    for _ in range(repeats):
        rows["merge_raw"].append(_merge(os.path.join(tmp, "merged_raw"), raw_parts))

    def nbytes(split):
        meta = json.load(open(os.path.join(split, "meta.json")))
        return sum(os.path.getsize(os.path.join(split, s["path"], "data.mdb")) for s in meta["shards"]) / 2**20

    tar_vs_files = [t / f for t, f in zip(rows["tar"], rows["files"])]
    cold_vs = [t / f for t, f in zip(rows["cold tar"], rows["cold files"])]
    parts_vs_one = [o / p for o, p in zip(rows["one"], rows["parts"])]
    with_merge = [o / p for o, p in zip(rows["one"], rows["parts+merge"])]
    print(f"\n| archives, {n} images, {workers} workers in all, {repeats} repeats | min / median / max |\n|---|---|")
    print(f"| images/s from the class folders | {_spread(rows['files'])} |")
    print(f"| images/s from the tar of class tars | {_spread(rows['tar'])} |")
    print(f"| tar / files, input in the page cache (goal >= 1x) | {_spread(tar_vs_files)} |")
    if cold_vs:
        print(f"| images/s from the class folders, page cache dropped | {_spread(rows['cold files'])} |")
        print(f"| images/s from the tar, page cache dropped | {_spread(rows['cold tar'])} |")
        print(f"| tar / files, page cache dropped (goal >= 1x) | {_spread(cold_vs)} |")
    print(f"| one build --workers {workers}, s | {_spread(rows['one'])} |")
    print(f"| {workers} parts at once, --workers 1 each, s | {_spread(rows['parts'])} |")
    print(f"| parts / one build, speed (goal >= 0.95x) | {_spread(parts_vs_one)} |")
    print(f"| parts + merge / one build, speed | {_spread(with_merge)} |")
    print(f"| merge, {nbytes(os.path.join(tmp, 'merged')):.0f} MiB of JPEG records, s | {_spread(rows['merge'])} |")
    raw_mib = nbytes(os.path.join(tmp, "merged_raw"))
    print(f"| merge, {raw_mib:.0f} MiB of raw records, s | {_spread(rows['merge_raw'])} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000, help="corpus size for the whole builds")
    p.add_argument("--option-images", type=int, default=1000, help="the first N images time the options")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "alexnet-bench-corpus"))
    p.add_argument("--sections", default="options,builds,archives", help="which of options, builds, archives")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    cv2.setNumThreads(1)
    paths = make_corpus(args.dir, args.images)
    workers = default_workers()
    if "archives" in sections:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            bench_archives(paths, tmp, args.repeats, workers)
    if "options" not in sections and "builds" not in sections:
        return
    listing = os.path.join(args.dir, f"list-{args.images}.txt")
    with open(listing, "w") as f:
        f.writelines(f"{os.path.basename(q)} 0\n" for q in paths)
    datas = [open(q, "rb").read() for q in paths]
    sizes = np.array([image_ops.header_size(d) for d in datas])
    print(f"corpus: {len(paths)} JPEGs, mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f}, "
          f"{np.mean([len(d) for d in datas]) / 1024:.0f} KiB average")

    rows, n_red = bench_options(datas[:args.option_images], args.repeats) if "options" in sections else ([], 0)
    print("" if not rows else f"\n| decode + resize to {SIZE}x{SIZE}, one core, {min(len(datas), args.option_images)} images | ms/image | MAD vs exact | ms/image, reducible "
          f"({n_red}) | MAD, reducible |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['option']} | {r['ms']:.2f} | {r['mad']:.2f} | {r['ms_reducible']:.2f} | {r['mad_reducible']:.2f} |")

    if "builds" not in sections:
        return
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
