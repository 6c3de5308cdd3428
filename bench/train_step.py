"""Does data loading hold training back? ``python -m bench.train_step [--crop 224] [--batch 64] [--steps 4]``.

Images/s of the full training step (copy, Normalize with the colour shift, forward, backward, SGD) fed by
``make_loader`` from a packed split, against the same step on one synthetic batch already in memory, in
the same run. The ratio is the share of the step's speed that survives real data (target >= 0.95).
"""
import argparse
import os
import statistics
import tempfile
import time

import torch
from torch.nn import functional as F

from alexnet.model import AlexNet
from bench.loader import prepare
from datasets import Normalize, make_loader


def step_time(model, normalize, optimizer, images, labels):
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(normalize(images)), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def interleaved(model, normalize, optimizer, loader, fixed, steps):
    """Alternate a step on the fixed batch with a step on the loader's next batch (its wait included), so
    both see the same machine; two warm-up rounds; medians."""
    synthetic, real = [], []
    it = iter(loader)
    for k in range(steps + 2):
        s = step_time(model, normalize, optimizer, *fixed)
        t0 = time.perf_counter()
        images, labels = next(it)
        r = time.perf_counter() - t0 + step_time(model, normalize, optimizer, images, labels)
        if k >= 2:
            synthetic.append(s)
            real.append(r)
    n = len(fixed[1])
    return n / statistics.median(synthetic), n / statistics.median(real)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "alexnet-bench-corpus"))
    args = p.parse_args(argv)
    _, _, splits = prepare(args.dir, args.images)
    loader = make_loader(splits["jpeg"], batch_size=args.batch, train=True, workers=args.workers, crop=args.crop)
    normalize = Normalize(loader.meta).train()
    model = AlexNet(len(loader.meta["classes"]), image_size=args.crop).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    fixed = next(iter(loader))
    synthetic, real = interleaved(model, normalize, optimizer, loader, fixed, args.steps)
    print(f"CPU, batch {args.batch}, {args.crop}x{args.crop}, jpeg split, {args.workers} loader workers\n")
    print("| training step fed by | images/s |\n|---|---|")
    print(f"| one synthetic batch in memory | {synthetic:.1f} |\n| make_loader over the jpeg split | {real:.1f} |")
    print(f"\nreal / synthetic: {real / synthetic:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
