"""Evaluation speed: ``python -m bench.evaluate [--images 256] [--batch 64] [--workers 2] [--device all]``.

Images/s of evaluate.py's prediction (loader to the device, Normalize, forward, softmax) with the centre crop and with
the ten patches, on the CPU (and the GPU when present), and the ratio of their times per image
(target <= 10.5: ten crops cost ten forwards and nothing more). A randomly initialised paper network on
256×256 records of the benchmark corpus; speed does not depend on the weights.
"""
import argparse
import os
import tempfile
import time

import torch

from alexnet.evaluation import predict
from alexnet.model import AlexNet
from bench.corpus import make_corpus
from datasets import Normalize, make_loader
from preprocess.build_lmdb import build


def small_split(work, n):
    out = os.path.join(work, f"eval-split-{n}")
    if not os.path.exists(out):
        paths = make_corpus(work, n)
        listing = os.path.join(work, f"eval-list-{n}.txt")
        with open(listing, "w") as f:
            f.writelines(f"{os.path.basename(p)} {i % 10}\n" for i, p in enumerate(paths))
        build(listing, out, root=os.path.dirname(paths[0]), quiet=True)
    return out


def speed(model, normalize, root, *, tencrop, batch, device, workers, repeats=2):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    best = 0.0
    for _ in range(repeats):
        loader = make_loader(root, batch_size=batch, train=False, workers=workers, crop=256 if tencrop else 224,
                             device=device)
        t0 = time.perf_counter()
        probs, _ = predict(model, normalize, loader, crop=224, tencrop=tencrop, autocast=autocast)
        best = max(best, len(probs) / (time.perf_counter() - t0))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="all", choices=["all", "cpu", "cuda"],
                   help="all: the CPU, and the GPU when present")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "alexnet-bench-corpus"))
    args = p.parse_args(argv)
    root = small_split(args.dir, args.images)
    devices = [torch.device("cpu")] if args.device in ("all", "cpu") else []
    devices += [torch.device("cuda")] if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()) else []
    print("| device | centre crop, images/s | 10-crop, images/s | time ratio 10-crop / centre |\n|---|---|---|---|")
    for device in devices:
        model = AlexNet(10).to(device, memory_format=torch.channels_last).eval()
        meta = make_loader(root, batch_size=1, train=False, workers=0).meta
        normalize = Normalize(meta).to(device).eval()
        centre = speed(model, normalize, root, tencrop=False, batch=args.batch, device=device, workers=args.workers)
        ten = speed(model, normalize, root, tencrop=True, batch=args.batch, device=device, workers=args.workers)
        print(f"| {device.type} | {centre:.1f} | {ten:.1f} | {centre / ten:.2f}x (target <= 10.5x) |")


if __name__ == "__main__":
    main()
