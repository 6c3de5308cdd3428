"""Loader throughput: ``python -m bench.loader [--images N] [--repeats R] [--seconds S]``.

On the same images, in the same run, 2 workers each, batch 128, 224 crops, two warm-up epochs each (so the
files are in the page cache for everyone), then rounds in which every loader runs whole epochs for at least
``--seconds``; each figure is min / median / max over the rounds, each ratio taken within a round:
- baseline A, the torchvision way written plainly: an ImageFolder of the 256×256 images as JPEG files, PIL
  decode, RandomCrop(224), flip, ToTensor, Normalize, through ``torch.utils.data.DataLoader``;
- baseline B, the same over the full-size originals with RandomResizedCrop(224), what most people run;
- ours: ``make_loader`` over the ``jpeg`` split and over the ``raw`` split, with both backends (2 worker
  processes writing into shared memory, the default; 2 threads in this process), and the decode-only
  limit: 2 threads doing nothing but ``cv2.imdecode`` on the same records;
- the price of ownership: the raw split through a pool that frees each slot as soon as it is yielded
  (what the loader did before leases, unsafe), against the default.
torchvision is not a dependency (and PyPI's build does not import beside the CPU torch here), so its
transforms are written out with Pillow and torch, as torchvision implements them.
"""
import argparse
import math
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from PIL import Image

from bench.corpus import make_corpus
from datasets import LMDBDataset, loader as loader_module, make_loader
from datasets.worker_pool import ProcessPool
from preprocess import image_ops
from preprocess.build_lmdb import build

BATCH, WORKERS, CROP, CLASSES = 128, 2, 224, 10
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def to_tensor_normalize(im):
    """torchvision's ToTensor then Normalize: HWC uint8 -> CHW float in 0–1 -> standardised."""
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return (x - MEAN) / STD


class ImageFolderA(torch.utils.data.Dataset):
    """Baseline A: 256×256 JPEG files; RandomCrop(224), RandomHorizontalFlip, ToTensor, Normalize."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path, label = self.files[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
        w, h = im.size
        left, top = random.randint(0, w - CROP), random.randint(0, h - CROP)
        im = im.crop((left, top, left + CROP, top + CROP))
        if random.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor_normalize(im), label


class ImageFolderB(ImageFolderA):
    """Baseline B: full-size JPEGs; RandomResizedCrop(224) (scale 0.08–1, ratio 3/4–4/3), flip, ToTensor, Normalize."""

    def __getitem__(self, i):
        path, label = self.files[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
        w, h = im.size
        for _ in range(10):  # torchvision's RandomResizedCrop.get_params
            area = w * h * random.uniform(0.08, 1.0)
            ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = random.randint(0, w - cw), random.randint(0, h - ch)
                break
        else:
            cw = ch = min(w, h)
            left, top = (w - cw) // 2, (h - ch) // 2
        im = im.resize((CROP, CROP), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        if random.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor_normalize(im), label


def _seed_worker(worker_id):
    random.seed(torch.initial_seed() % 2**32)


def epoch_speed(iterable):
    t0, n = time.perf_counter(), 0
    for _, labels in iterable:
        n += len(labels)
    return n / (time.perf_counter() - t0)


def decode_only(records):
    """The JPEG decoder alone on the same records, 2 threads: the limit of any JPEG loader here."""
    chunks = [records[k::WORKERS] for k in range(WORKERS)]

    def work(chunk):
        for data in chunk:
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
        return len(chunk)

    with ThreadPoolExecutor(WORKERS) as pool:
        t0 = time.perf_counter()
        n = sum(pool.map(work, chunks))
        return n / (time.perf_counter() - t0)


def prepare(work, n):
    """The corpus in three forms: full-size originals, 256×256 JPEG files, and the jpeg and raw splits."""
    paths = make_corpus(work, n)
    originals = [(p, i % CLASSES) for i, p in enumerate(paths)]
    small_dir = os.path.join(work, f"small-{n}")
    small = [(os.path.join(small_dir, f"{i:06d}.jpg"), label) for i, (p, label) in enumerate(originals)]
    if not all(os.path.exists(p) for p, _ in small):
        os.makedirs(small_dir, exist_ok=True)
        for (src, _), (dst, _) in zip(originals, small):
            with open(src, "rb") as f:
                square = image_ops.to_square(image_ops.decode(f.read()), 256)
            cv2.imwrite(dst, square, [cv2.IMWRITE_JPEG_QUALITY, 90])
    listing = os.path.join(work, f"loader-list-{n}.txt")
    with open(listing, "w") as f:
        f.writelines(f"{os.path.basename(p)} {label}\n" for p, label in small)
    splits = {}
    for enc in ("jpeg", "raw"):
        out = os.path.join(work, f"split-{enc}-{n}")
        if not os.path.exists(out):
            build(listing, out, root=small_dir, size=256, encoding=enc, quiet=True)
        splits[enc] = out
    return originals, small, splits


class UnownedPool(ProcessPool):
    """The pool without ownership, as it was before leases: a slot is free again the moment it is yielded,
    so a worker may overwrite a batch the caller still reads. Unsafe; here only to price the leases."""

    def _lease(self, slot, n):
        self._release(slot)
        return self.images[slot][:n]


def unowned_loader(root):
    loader = make_loader(root, batch_size=BATCH, train=True, workers=WORKERS, backend="processes")
    original, loader_module.ProcessPool = loader_module.ProcessPool, UnownedPool
    try:
        epoch_speed(loader)  # starts its pool
    finally:
        loader_module.ProcessPool = original
    return loader


def timed(loader, seconds):
    """Images/s over whole epochs, as many as take at least ``seconds``."""
    t0, n, epoch = time.perf_counter(), 0, 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch := epoch + 1)
        for _, labels in loader:
            n += len(labels)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n / elapsed


def spread(values):
    return f"{min(values):,.0f} / {statistics.median(values):,.0f} / {max(values):,.0f}"


def ratio_spread(values):
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


BASE = "baseline A: ImageFolder 256x256 JPEG, PIL, DataLoader"
LIMIT = "decode-only limit: cv2.imdecode, 2 threads"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="rounds; every figure is min / median / max over them")
    p.add_argument("--seconds", type=float, default=4.0, help="least time per measurement (whole epochs)")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "alexnet-bench-corpus"))
    args = p.parse_args(argv)
    originals, small, splits = prepare(args.dir, args.images)
    ds = LMDBDataset(splits["jpeg"])
    jpeg_records = [r["image"] for r in ds.records(range(len(ds)))]

    def dataloader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                                           drop_last=True, persistent_workers=True, worker_init_fn=_seed_worker)

    def ours(enc, backend):
        return make_loader(splits[enc], batch_size=BATCH, train=True, workers=WORKERS, backend=backend)

    candidates = {
        BASE: dataloader(ImageFolderA(small)),
        "baseline B: ImageFolder full-size JPEG, RandomResizedCrop": dataloader(ImageFolderB(originals)),
        "ours, jpeg split, 2 processes": ours("jpeg", "processes"),
        "ours, jpeg split, 2 threads": ours("jpeg", "threads"),
        "ours, raw split, 2 processes": ours("raw", "processes"),
        "ours, raw split, 2 threads": ours("raw", "threads"),
        "raw split, 2 processes, without ownership (unsafe)": unowned_loader(splits["raw"]),
    }
    speeds = {name: [] for name in [*candidates, LIMIT]}
    for loader in candidates.values():  # warm-up: page cache, worker start, first touch of the maps
        for _ in range(2):
            epoch_speed(loader)
    for _ in range(args.repeats):
        for name, loader in candidates.items():
            speeds[name].append(timed(loader, args.seconds))
        speeds[LIMIT].append(statistics.mean(decode_only(jpeg_records) for _ in range(3)))
    vs_base = {k: [a / b for a, b in zip(v, speeds[BASE])] for k, v in speeds.items()}
    print(f"{args.images} images, batch {BATCH}, {WORKERS} workers, {CROP} crops of 256; {args.repeats} rounds, "
          f"each loader >= {args.seconds:g} s of whole epochs per round; min / median / max over the rounds\n")
    print("| loader | images/s | vs baseline A, same round |\n|---|---|---|")
    for name in speeds:
        print(f"| {name} | {spread(speeds[name])} | {ratio_spread(vs_base[name])} |")
    best = {enc: [max(a, b) for a, b in zip(speeds[f"ours, {enc} split, 2 threads"],
                                           speeds[f"ours, {enc} split, 2 processes"])] for enc in ("jpeg", "raw")}
    owned, unowned = speeds["ours, raw split, 2 processes"], speeds["raw split, 2 processes, without ownership (unsafe)"]
    print(f"\njpeg: {ratio_spread([b / a for a, b in zip(speeds[BASE], best['jpeg'])])}x baseline A (target >= 4x); "
          f"raw: {ratio_spread([b / a for a, b in zip(speeds[BASE], best['raw'])])}x (target >= 15x); "
          f"decode-only limit / jpeg: {ratio_spread([a / b for a, b in zip(speeds[LIMIT], best['jpeg'])])}x "
          f"(target <= 1.3x)")
    print(f"ownership (leased slots), raw, 2 processes: with / without = {ratio_spread([a / b for a, b in zip(owned, unowned)])}")


if __name__ == "__main__":
    main()
