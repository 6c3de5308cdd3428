"""The paper's table for the network as built: ``python -m alexnet.summary [--image-size 224] [--groups 2]``.

Each layer's output shape, parameters and multiply-adds (a multiply-add per weight use: a convolution
costs out_h·out_w·out_c·(in_c/groups)·k·k, a linear layer in·out), and the totals.
"""
import argparse

import torch
from torch import nn

from alexnet.model import AlexNet
from datasets import cli


def layer_table(model, image_size):
    """Rows of (name, output shape, parameters, multiply-adds), traced with a 1-image forward pass."""
    rows = []

    def hook(name):
        def record(module, inputs, output):
            params = sum(p.numel() for p in module.parameters(recurse=False))
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs = output.shape[2] * output.shape[3] * module.out_channels * module.in_channels // module.groups * kh * kw
            elif isinstance(module, nn.Linear):
                macs = module.in_features * module.out_features
            else:
                macs = 0
            rows.append((name, tuple(output.shape[1:]), params, macs))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if not list(m.children())]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in handles:
        h.remove()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m alexnet.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--groups", type=int, default=1, choices=(1, 2))
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--no-lrn", dest="lrn", action="store_false")
    args = p.parse_args(argv)
    if args.image_size > 4096:
        raise ValueError(f"--image-size {args.image_size}: at most 4096 (the paper's is 224)")
    model = AlexNet(args.num_classes, image_size=args.image_size, groups=args.groups, lrn=args.lrn)
    rows = layer_table(model, args.image_size)
    print(f"AlexNet, {args.image_size}x{args.image_size} input, groups={args.groups}, {args.num_classes} classes\n")
    print(f"{'layer':<18}{'output':>16}{'parameters':>14}{'mult-adds':>16}")
    for name, shape, params, macs in rows:
        print(f"{name:<18}{'x'.join(map(str, shape)):>16}{params:>14,}{macs:>16,}")
    total_params = sum(r[2] for r in rows)
    total_macs = sum(r[3] for r in rows)
    print(f"{'total':<18}{'':>16}{total_params:>14,}{total_macs:>16,}")
    print(f"\n{total_params / 1e6:.2f} M parameters, {total_macs / 1e9:.3f} G multiply-adds per image")
    return 0


if __name__ == "__main__":
    cli.run(main, (ValueError,))
