"""Model speed: ``python -m bench.model [--batch 64] [--size 224] [--steps 3]``.

Forward + backward (+ SGD step) images/s of the paper network on this machine's CPU, in one run:
contiguous or channels-last, eager or ``torch.compile``; the same network without LRN and with
``nn.LocalResponseNorm`` (the LRN's cost); and the achieved GFLOP/s (3 × the forward multiply-adds × 2)
as a fraction of this machine's own float32 matmul rate, measured in the same run.
On CUDA (when present) it also measures bf16 autocast, channels-last, compiled, at batch 128 and 256.
"""
import argparse
import statistics
import time

import torch
from torch import nn

from alexnet.model import AlexNet
from alexnet.summary import layer_table


def matmul_gflops(device, n=2048, repeats=10):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_speed(model, batch, size, steps, device, *, channels_last=False, compile=False, bf16=False):
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fn = torch.compile(model) if compile else model
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(fn(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up (and compilation)
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


class TorchLRN(nn.LocalResponseNorm):
    """The paper's LRN through ``nn.LocalResponseNorm`` (alpha × n, since it divides alpha by n)."""

    def __init__(self):
        super().__init__(5, alpha=5e-4, beta=0.75, k=2.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--device", default="all", choices=["all", "cpu", "cuda"],
                   help="all: the CPU table, and the GPU's when present")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.device in ("all", "cpu"):
        cpu_table(args)
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        cuda = torch.device("cuda")
        print(f"\nCUDA {torch.cuda.get_device_name()}: fwd+bwd+SGD, bf16 autocast, channels-last, compiled, "
              f"{args.size}x{args.size}")
        for batch in (128, 256):
            ips = step_speed(AlexNet(), batch, args.size, 20, cuda, channels_last=True, compile=True, bf16=True)
            print(f"| batch {batch} | {ips:.0f} images/s |")


def cpu_table(args):
    device = torch.device("cpu")
    macs = sum(r[3] for r in layer_table(AlexNet(), args.size))
    gemm = matmul_gflops(device)
    print(f"CPU, {torch.get_num_threads()} threads: float32 matmul {gemm:.0f} GFLOP/s; "
          f"batch {args.batch}, {args.size}x{args.size}, {macs / 1e9:.3f} G multiply-adds forward (groups 1)\n")
    configs = [
        ("paper network, contiguous, eager", {}),
        ("paper network, channels-last, eager", {"channels_last": True}),
    ]
    if args.compile:
        configs += [("paper network, contiguous, compiled", {"compile": True}),
                    ("paper network, channels-last, compiled", {"channels_last": True, "compile": True})]
    rows = [(name, step_speed(AlexNet(), args.batch, args.size, args.steps, device, **kw)) for name, kw in configs]
    rows.append(("without LRN, channels-last, eager",
                 step_speed(AlexNet(lrn=False), args.batch, args.size, args.steps, device, channels_last=True)))
    if args.compile:
        rows.append(("without LRN, contiguous, compiled",
                     step_speed(AlexNet(lrn=False), args.batch, args.size, args.steps, device, compile=True)))
    torch_lrn = AlexNet()
    torch_lrn.features.norm1, torch_lrn.features.norm2 = TorchLRN(), TorchLRN()
    rows.append(("nn.LocalResponseNorm as LRN, channels-last, eager",
                 step_speed(torch_lrn, args.batch, args.size, args.steps, device, channels_last=True)))
    print("| network, CPU fwd+bwd+SGD | images/s | GFLOP/s | of matmul rate |\n|---|---|---|---|")
    for name, ips in rows:
        gflops = ips * 3 * 2 * macs / 1e9
        print(f"| {name} | {ips:.1f} | {gflops:.0f} | {gflops / gemm:.0%} |")
    speed = dict(rows)
    print(f"\nLRN share of the step, eager channels-last: "
          f"{1 - speed['paper network, channels-last, eager'] / speed['without LRN, channels-last, eager']:.1%}"
          + (f"; compiled: {1 - speed['paper network, contiguous, compiled'] / speed['without LRN, contiguous, compiled']:.1%}"
             if args.compile else "") + " (target < 10%)")


if __name__ == "__main__":
    main()
