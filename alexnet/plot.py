"""Training curves of a run: ``python -m alexnet.plot OUT_DIR [--out OUT_DIR/curves.png]``.

Three panels from OUT_DIR/metrics.jsonl: train and val loss; train top-1, val top-1 and top-5 (as error,
the paper's unit); and the learning rate (log scale), each against the epoch.
"""
import argparse
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from alexnet.run import RunError, read_log  # noqa: E402
from datasets import cli  # noqa: E402
from datasets.format import atomic_path  # noqa: E402


def plot(out_dir, out=None):
    rows = read_log(out_dir)
    if not rows:
        raise RunError(f"{out_dir}/metrics.jsonl has no epochs yet; plot after the first epoch")
    out = out or os.path.join(out_dir, "curves.png")
    epoch = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_err, ax_lr) = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    ax_loss.plot(epoch, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(epoch, [r["val_loss"] for r in rows], label="val")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_err.plot(epoch, [100 * (1 - r["train_top1"]) for r in rows], label="train top-1")
    ax_err.plot(epoch, [100 * (1 - r["val_top1"]) for r in rows], label="val top-1")
    ax_err.plot(epoch, [100 * (1 - r["val_top5"]) for r in rows], label="val top-5")
    ax_err.set(title="error (%)", xlabel="epoch")
    ax_lr.plot(epoch, [r["lr"] for r in rows])
    ax_lr.set(title="learning rate", xlabel="epoch", yscale="log")
    for ax in (ax_loss, ax_err):
        ax.legend()
    for ax in (ax_loss, ax_err, ax_lr):
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(out_dir)))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m alexnet.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="a run folder written by train.py")
    p.add_argument("--out", help="PNG path (default: OUT_DIR/curves.png)")
    args = p.parse_args(argv)
    print(f"wrote {plot(args.out_dir, args.out)}")
    return 0


if __name__ == "__main__":
    cli.run(main, (RunError,))
