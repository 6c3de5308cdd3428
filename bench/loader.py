"""Loader throughput: ``python -m bench.loader [--images N] [--repeats R]``.

On the same images, in the same run, 2 workers each, batch 128, 224 crops, one epoch per measurement
after a warm-up epoch (so the files are in the page cache for everyone):
- baseline A, the torchvision way written plainly: an ImageFolder of the 256×256 images as JPEG files, PIL
  decode, RandomCrop(224), flip, ToTensor, Normalize, through ``torch.utils.data.DataLoader``;
- baseline B, the same over the full-size originals with RandomResizedCrop(224), what most people run;
- ours: ``make_loader`` over the ``jpeg`` split and over the ``raw`` split, with both backends (2 worker
  processes writing into shared memory, the default; 2 threads in this process), and the decode-only
  limit: 2 threads doing nothing but ``cv2.imdecode`` on the same records.
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
from datasets import LMDBDataset, make_loader
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "alexnet-bench-corpus"))
    args = p.parse_args(argv)
    originals, small, splits = prepare(args.dir, args.images)
    ds = LMDBDataset(splits["jpeg"])
    jpeg_records = [r["image"] for r in ds.records(range(len(ds)))]

    def dataloader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                                           drop_last=True, persistent_workers=True, worker_init_fn=_seed_worker)

    candidates = {
        "baseline A: ImageFolder 256x256 JPEG, PIL, DataLoader": dataloader(ImageFolderA(small)),
        "baseline B: ImageFolder full-size JPEG, RandomResizedCrop": dataloader(ImageFolderB(originals)),
        "ours, jpeg split, 2 processes": make_loader(splits["jpeg"], batch_size=BATCH, train=True, workers=WORKERS,
                                                     backend="processes"),
        "ours, jpeg split, 2 threads": make_loader(splits["jpeg"], batch_size=BATCH, train=True, workers=WORKERS,
                                                   backend="threads"),
        "ours, raw split, 2 processes": make_loader(splits["raw"], batch_size=BATCH, train=True, workers=WORKERS,
                                                    backend="processes"),
        "ours, raw split, 2 threads": make_loader(splits["raw"], batch_size=BATCH, train=True, workers=WORKERS,
                                                  backend="threads"),
    }
    speeds = {name: [] for name in candidates}
    speeds["decode-only limit: cv2.imdecode, 2 threads"] = []
    for name, loader in candidates.items():  # warm-up: page cache, worker start, first touch of the maps
        for _ in range(2):
            epoch_speed(loader)
    for epoch in range(args.repeats):
        for name, loader in candidates.items():
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch + 1)
            speeds[name].append(epoch_speed(loader))
        speeds["decode-only limit: cv2.imdecode, 2 threads"].append(decode_only(jpeg_records))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    base = med["baseline A: ImageFolder 256x256 JPEG, PIL, DataLoader"]
    limit = med["decode-only limit: cv2.imdecode, 2 threads"]
    print(f"{args.images} images, batch {BATCH}, {WORKERS} workers, {CROP} crops of 256; median of {args.repeats} epochs\n")
    print("| loader | images/s | vs baseline A |\n|---|---|---|")
    for name, v in med.items():
        print(f"| {name} | {v:.0f} | {v / base:.2f}x |")
    best_jpeg = max(med["ours, jpeg split, 2 threads"], med["ours, jpeg split, 2 processes"])
    best_raw = max(med["ours, raw split, 2 threads"], med["ours, raw split, 2 processes"])
    print(f"\njpeg: {best_jpeg / base:.2f}x baseline A (target >= 4x); raw: {best_raw / base:.2f}x (target >= 15x); "
          f"decode-only limit / jpeg: {limit / best_jpeg:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
