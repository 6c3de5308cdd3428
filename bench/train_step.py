"""Does data loading hold training back? ``python -m bench.train_step [--device cpu|cuda] [--split jpeg|raw]``.

Images/s of the full training step (Normalize with the colour shift, forward, backward, SGD) fed by
``make_loader`` (its batches already on the device: the loader copies them ahead of use) against the same
step on one synthetic uint8 batch already on the device, in the same run. The two alternate in windows of
``--steps`` steps (the device synchronised at each window's end, so pipelining within a window counts),
``--repeats`` times; the ratio real / synthetic of each pair of windows is reported as min / median / max.
Target: >= 0.95. On CUDA: bf16 autocast and ``torch.compile`` by default, as train.py runs.
"""
import argparse
import itertools
import os
import statistics
import tempfile
import time

import torch
from torch.nn import functional as F

from alexnet.model import AlexNet
from bench.loader import prepare
from datasets import Normalize, make_loader


def endless(loader):
    """The loader's batches, epoch after epoch."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def window(step, batches, steps, device):
    """Seconds for ``steps`` training steps on ``batches`` (waiting for data included), device synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(args):
    device = torch.device(args.device)
    _, _, splits = prepare(args.dir, args.images)
    loader = make_loader(splits[args.split], batch_size=args.batch, train=True, workers=args.workers,
                         crop=args.crop, device=device)
    normalize = Normalize(loader.meta).to(device).train()
    net = AlexNet(len(loader.meta["classes"]), image_size=args.crop).to(device, memory_format=torch.channels_last)
    model = torch.compile(net) if args.compile else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step(images, labels):
        with autocast:
            loss = F.cross_entropy(model(normalize(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    real = endless(loader)
    fixed = tuple(t.clone() for t in next(real))
    synthetic = itertools.repeat(fixed)
    for _ in range(2):  # warm-up: compilation, allocator, worker start, page cache
        window(step, synthetic, args.steps, device)
        window(step, real, args.steps, device)
    pairs = []
    for _ in range(args.repeats):
        s = window(step, synthetic, args.steps, device)
        r = window(step, real, args.steps, device)
        pairs.append((args.batch * args.steps / s, args.batch * args.steps / r))
    loader.close()
    return pairs


def spread(values):
    return min(values), statistics.median(values), max(values)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--split", default="jpeg", choices=["jpeg", "raw"])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=None, help="default: 64 on the CPU, 256 on CUDA")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--steps", type=int, default=None, help="steps per window (default: 2 on the CPU, 50 on CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA only")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA only")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "alexnet-bench-corpus"))
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.batch = args.batch or (256 if cuda else 64)
    args.steps = args.steps or (50 if cuda else 2)
    args.compile = cuda if args.compile is None else args.compile
    args.bf16 = cuda if args.bf16 is None else args.bf16
    pairs = measure(args)
    syn, real = [s for s, _ in pairs], [r for _, r in pairs]
    ratios = [r / s for s, r in pairs]
    where = torch.cuda.get_device_name(args.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; batch {args.batch}, {args.crop}x{args.crop}, {args.split} split, {args.workers} loader workers, "
          f"{'bf16' if args.bf16 else 'float32'}, {'compiled' if args.compile else 'eager'}; "
          f"{args.repeats} pairs of {args.steps}-step windows\n")
    print("| training step fed by | images/s, min / median / max |\n|---|---|")
    print("| one synthetic uint8 batch on the device | {:.1f} / {:.1f} / {:.1f} |".format(*spread(syn)))
    print("| make_loader(device=...) over the {} split | {:.1f} / {:.1f} / {:.1f} |".format(args.split, *spread(real)))
    print("\nreal / synthetic: {:.3f} / {:.3f} / {:.3f} (min / median / max; target >= 0.95)".format(*spread(ratios)))
    return {"synthetic": syn, "real": real, "ratios": ratios}


if __name__ == "__main__":
    main()
