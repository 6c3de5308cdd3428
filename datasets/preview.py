"""See training crops as the network sees them: ``python -m datasets.preview ROOT --out preview.png``.

A grid of random training crops (random crop and flip, as in training), each shown before and after the
paper's PCA colour shift, labelled with its class name, so a person can check the augmentation by eye.
``--pca-std`` exaggerates the shift to make its direction visible (the paper's is 0.1).
"""
import argparse

import cv2
import numpy as np
import torch

from datasets import cli
from datasets.format import atomic_path
from datasets.loader import make_loader
from datasets.transforms import pca_lighting


def preview(root, out, *, count=16, columns=4, crop=None, pca_std=0.1, seed=0, cell=160):
    loader = make_loader(root, batch_size=count, train=True, workers=0, seed=seed, crop=crop)
    if count > len(loader.dataset):
        raise ValueError(f"--count {count}: {root} has {len(loader.dataset)} records")
    images, labels = next(iter(loader))
    meta = loader.meta
    generator = torch.Generator().manual_seed(seed)
    shift = pca_lighting(count, torch.tensor(meta["pca_eigval"]), torch.tensor(meta["pca_eigvec"]), pca_std,
                         generator=generator)
    before = images.permute(0, 2, 3, 1).numpy()
    after = (images.float() + shift.view(-1, 3, 1, 1)).clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
    tiles = []
    for k in range(count):
        pair = [cv2.resize(im, (cell, cell), interpolation=cv2.INTER_NEAREST) for im in (before[k], after[k])]
        tile = np.full((cell + 22, 2 * cell + 6, 3), 255, np.uint8)
        tile[:cell, :cell], tile[:cell, cell + 6:] = pair
        name = meta["classes"][int(labels[k])]
        dr, dg, db = shift[k].tolist()
        cv2.putText(tile, f"{name}  shift {dr:+.0f},{dg:+.0f},{db:+.0f}", (2, cell + 16),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.pad(tile, ((4, 4), (4, 4), (0, 0)), constant_values=255))
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.vstack([np.hstack(tiles[r:r + columns]) for r in range(0, len(tiles), columns)])
    header = np.full((28, grid.shape[1], 3), 255, np.uint8)
    cv2.putText(header, f"{root}: crop {images.shape[-1]}, left as stored, right with the PCA colour shift "
                        f"(pca_std {pca_std})", (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    grid = np.vstack([header, grid])
    with atomic_path(out) as tmp:
        try:
            written = cv2.imwrite(tmp, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        except cv2.error:
            written = False
        if not written:
            raise ValueError(f"--out {out}: cannot write an image there (use an image extension, e.g. .png)")
    return grid.shape


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m datasets.preview", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="a packed split")
    p.add_argument("--out", default="preview.png")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--crop", type=int, help="crop size (default: the split's size - 32)")
    p.add_argument("--pca-std", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("count", "columns"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: must be at least 1")
    preview(args.root, args.out, count=args.count, columns=args.columns, crop=args.crop, pca_std=args.pca_std,
            seed=args.seed)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main, (ValueError,))
