"""The paper's pictures of what a trained network learned, from any run:
``python -m alexnet.figures RUN_DIR [--data VAL]``.

- ``figure3.png``: the 96 first-layer kernels (11×11×3) as an image grid, each rescaled to the full 0–255 range
  on its own; with ``model.groups=2`` the 48 of each tower form a block of their own, as in the paper (Fig. 3).
- ``figure4.png``: five validation images (first column) and, beside each, the six training images whose fc7
  features (the last hidden layer, 4096 values after its ReLU) are nearest by Euclidean distance (Fig. 4).
- ``confusion.png``: the validation split's confusion matrix of centre-crop predictions, each row divided by
  its count (next to the per-class CSV that ``evaluate.py`` writes in the run folder).

Images are the centre crops the network sees; the checkpoint is RUN_DIR's best.pt (else last.pt).
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

from alexnet import evaluation
from alexnet.checkpoint import CheckpointError
from alexnet.run import RunError, open_split
from datasets import cli, format as fmt, make_loader

SCALE, GAP, TOWER_GAP, BORDER = 4, 2, 8, 2  # figure 3: pixels per kernel pixel, between tiles, between towers
PER_ROW = 16
NEIGHBOURS, QUERIES, FIG4_GAP, FIG4_SPLIT = 6, 5, 4, 12


class FigureError(ValueError):
    """A run or split the figures cannot be drawn from; the message says why."""


def run_checkpoint(run_dir):
    for name in ("best.pt", "last.pt"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            return path
    raise FigureError(f"{run_dir}: neither best.pt nor last.pt; give the folder of a train.py run")


def kernel_tile(w):
    """One first-layer kernel [3, 11, 11] as an RGB uint8 tile, rescaled to 0–255 on its own, enlarged SCALE×."""
    w = np.asarray(w, np.float64)
    lo, hi = w.min(), w.max()
    rgb = np.rint((w - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(w)).astype(np.uint8)
    return np.kron(rgb.transpose(1, 2, 0), np.ones((SCALE, SCALE, 1), np.uint8))


def kernel_positions(n, groups):
    """(top, left) of each kernel's tile: rows of PER_ROW, each tower a block of its own."""
    per_tower = n // groups
    tile = 11 * SCALE
    out = []
    for k in range(n):
        tower, j = divmod(k, per_tower)
        row = tower * -(-per_tower // PER_ROW) + j // PER_ROW
        top = BORDER + row * (tile + GAP) + tower * (TOWER_GAP - GAP)
        out.append((top, BORDER + (j % PER_ROW) * (tile + GAP)))
    return out


def figure3(weights, groups):
    """The grid of ``weights`` [96, 3, 11, 11] as an RGB uint8 array (white between tiles)."""
    n, tile = len(weights), 11 * SCALE
    positions = kernel_positions(n, groups)
    height = max(t for t, _ in positions) + tile + BORDER
    width = BORDER * 2 + PER_ROW * tile + (PER_ROW - 1) * GAP
    canvas = np.full((height, width, 3), 255, np.uint8)
    for w, (top, left) in zip(weights, positions):
        canvas[top:top + tile, left:left + tile] = kernel_tile(w)
    return canvas


def _centre(image, crop):
    c = (image.shape[0] - crop) // 2
    return image[c:c + crop, c:c + crop]


def _fc7(model, normalize, images):
    """The last hidden layer's features (after its ReLU) of a uint8 batch: fc6, relu6, drop6, fc7, relu7
    (dropout is off in eval mode)."""
    return model.classifier[:5](torch.flatten(model.features(normalize(images)), 1)).float()


@torch.no_grad()
def fc7(model, normalize, loader):
    """fc7 features of every image the loader gives, in order, and their labels."""
    out, labels = [], []
    for images, y in loader:
        out.append(_fc7(model, normalize, images))
        labels.append(y)
    return torch.cat(out), torch.cat(labels)


@torch.no_grad()
def nearest(model, normalize, train_loader, queries, k):
    """Indices of the ``k`` training images nearest each query (Euclidean, fc7), streaming: nothing of the
    training set is kept but the best ``k`` so far per query."""
    best_d = torch.full((len(queries), k), float("inf"))
    best_i = torch.zeros((len(queries), k), dtype=torch.long)
    seen = 0
    for images, _ in train_loader:
        f = _fc7(model, normalize, images)
        d = torch.cdist(queries, f)
        d_all = torch.cat([best_d, d], 1)
        i_all = torch.cat([best_i, torch.arange(seen, seen + len(f)).expand(len(queries), -1)], 1)
        best_d, pick = d_all.topk(k, dim=1, largest=False)
        best_i = i_all.gather(1, pick)
        seen += len(f)
    return best_i.numpy()


def figure4(query_images, neighbour_images):
    """Rows of a query and its neighbours (all crop×crop RGB uint8) as one RGB uint8 array."""
    crop = query_images[0].shape[0]
    cols = 1 + neighbour_images.shape[1]
    width = 2 * BORDER + cols * crop + (cols - 2) * FIG4_GAP + FIG4_SPLIT
    height = 2 * BORDER + len(query_images) * crop + (len(query_images) - 1) * FIG4_GAP
    canvas = np.full((height, width, 3), 255, np.uint8)
    for r, (q, row) in enumerate(zip(query_images, neighbour_images)):
        top = BORDER + r * (crop + FIG4_GAP)
        canvas[top:top + crop, BORDER:BORDER + crop] = q
        for c, img in enumerate(row):
            left = BORDER + crop + FIG4_SPLIT + c * (crop + FIG4_GAP)
            canvas[top:top + crop, left:left + crop] = img
    return canvas


def confusion(probs_pred, labels, n):
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (labels, probs_pred), 1)
    return m


def draw_confusion(matrix, classes, path):
    """Rows: true class, columns: predicted, each row divided by its count; 800×800 pixels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 8), dpi=100)
    im = ax.imshow(rates, cmap="viridis", vmin=0, vmax=1)
    if len(classes) <= 30:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion, centre crop ({int(matrix.sum())} images)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    with fmt.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def save_png(array, path):
    with fmt.atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def make_figures(run_dir, data=None, *, train_limit=None, workers=2, batch_size=64, quiet=False):
    """Write figure3.png, figure4.png and confusion.png into ``run_dir``; returns their paths."""
    path = run_checkpoint(run_dir)
    model, normalize, ckpt = evaluation.load_model(path, torch.device("cpu"))
    weights = ckpt["model"]["features.conv1.weight"].float().numpy()
    out = {name: os.path.join(run_dir, f"{name}.png") for name in ("figure3", "figure4", "confusion")}
    save_png(figure3(weights, ckpt["config"]["model"]["groups"]), out["figure3"])

    crop = ckpt["config"]["data"]["crop"]
    data = data or ckpt["config"]["data"]["val"]
    val = open_split(data, "--data")
    train = open_split(ckpt["config"]["data"]["train"], "data.train")
    evaluation.check_classes(ckpt, path, val.classes, data)
    evaluation.check_size(ckpt, path, val.meta["size"], data, tencrop=False)
    searched = min(len(train), train_limit if train_limit is not None else len(train))
    if searched < NEIGHBOURS:
        raise FigureError(f"figure 4 needs at least {NEIGHBOURS} training images to search, got {searched}"
                          + (" (--train-limit)" if train_limit is not None else f" in {train.root}"))
    features, labels = fc7(model, normalize, make_loader(val, batch_size=batch_size, train=False, workers=workers,
                                                          crop=crop))
    predicted = model.classifier[5:](features).argmax(1).numpy()  # fc8 of the same features
    draw_confusion(confusion(predicted, labels.numpy(), len(val.classes)), val.meta.get("class_names") or
                   val.classes, out["confusion"])
    picks = np.unique(np.linspace(0, len(val) - 1, QUERIES).round().astype(int))  # fewer rows for a tiny split
    train_loader = make_loader(train, batch_size=batch_size, train=False, workers=workers, crop=crop)
    if train_limit is not None and train_limit < len(train):
        train_loader = _first(train_loader, train_limit)
    near = nearest(model, normalize, train_loader, features[torch.from_numpy(picks)], NEIGHBOURS)
    queries = [_centre(val[int(i)][0], crop) for i in picks]
    neighbours = np.stack([[_centre(train[int(j)][0], crop) for j in row] for row in near])
    save_png(figure4(queries, neighbours), out["figure4"])
    if not quiet:
        print(f"{run_dir}: figure3.png, figure4.png, confusion.png", file=sys.stderr)
    return out


def _first(loader, n):
    """The loader's batches up to ``n`` images."""
    seen = 0
    for images, labels in loader:
        if seen >= n:
            return
        keep = min(len(images), n - seen)
        yield images[:keep], labels[:keep]
        seen += keep


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m alexnet.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a train.py run folder (its best.pt, else last.pt)")
    p.add_argument("--data", help="validation split (default: the checkpoint's data.val)")
    p.add_argument("--train-limit", type=int, help="search the first N training records only (default: all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.workers < 0:
        raise FigureError(f"--workers {args.workers}: must be 0 or more")
    make_figures(args.run_dir, args.data, train_limit=args.train_limit, workers=args.workers, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    cli.run(main, (FigureError, CheckpointError, evaluation.EvaluationError, RunError, fmt.FormatError))
