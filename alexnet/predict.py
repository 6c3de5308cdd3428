"""Classify images with a trained network:
``python -m alexnet.predict IMAGE|FOLDER|LIST --checkpoint best.pt [--tencrop] [--top 5] [--json]``.

Each image is prepared exactly as its training split's records were made and tested: the builder's decode
(``preprocess.build_lmdb.to_record_image``: EXIF orientation, CMYK, 16-bit and the rest converted; shorter side
to the split's size, centre square), the split's own encoding and quality (so the pixels are a record's
pixels), then ``evaluate.py``'s centre crop, or its ten crops with their softmax averaged (paper Sec. 4.1), and
the checkpoint's normalisation. A file that cannot become a record is skipped with the builder's reason.
"""
import argparse
import contextlib
import json
import os
import sys

import cv2
import numpy as np
import torch
from tqdm import tqdm

from alexnet import evaluation
from alexnet.checkpoint import CheckpointError
from alexnet.run import RunError, pick_device
from datasets import cli, format as fmt
from preprocess import image_ops
from preprocess.build_lmdb import Options, to_record_image
from preprocess.sources import IMAGE_EXTENSIONS, FileSource, _walk_links, printable

_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n")  # JPEG, PNG: bytes no UTF-8 text starts with


class PredictError(ValueError):
    """Inputs that cannot be read at all; the message names the file or line."""


def inputs(target):
    """Image paths of IMAGE (a file), FOLDER (its images, recursively, in the builder's order and with its rules
    for links: each real folder read once) or LIST (a text file of paths, one per line, relative to the list's
    folder; a Caffe list's trailing label is ignored)."""
    if os.path.isdir(target):
        found = _walk_links(target, "", os.path.realpath(target), {}, [])
        if not found:
            raise PredictError(f"{target}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return [os.path.join(target, f) for f in found]
    if not os.path.isfile(target):
        raise PredictError(f"{target}: no such file or folder")
    with open(target, "rb") as f:
        head = f.read(16)
    if target.lower().endswith(IMAGE_EXTENSIONS) or head.startswith(_MAGIC):
        return [target]
    try:
        with open(target, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError:
        raise PredictError(f"{target}: neither an image nor a text list of image paths") from None
    base = os.path.dirname(os.path.abspath(target))
    paths = []
    for line in filter(None, lines):
        parts = line.rsplit(None, 1)
        path = parts[0] if len(parts) == 2 and parts[1].lstrip("-").isdigit() else line
        paths.append(os.path.join(base, path))
    if not paths:
        raise PredictError(f"{target}: an empty list")
    return paths


def record_options(meta):
    """The builder's options of the checkpoint's training split (older checkpoints: the builder's defaults)."""
    pre = meta.get("preprocess") or {}
    quality = meta.get("quality") or 90
    return Options(size=meta["size"], encoding=meta["encoding"],
                   quality=quality if meta["encoding"] == "jpeg" else None, exact=pre.get("exact", False),
                   max_pixels=pre.get("max_pixels") or Options.max_pixels)


def prepare(data, opts, name):
    """The H×W×3 RGB uint8 pixels a record of this file would decode to; raises image_ops.SkipImage."""
    square = to_record_image(data, opts)
    if opts.encoding == "raw":
        return cv2.cvtColor(square, cv2.COLOR_BGR2RGB)
    encoded = fmt.encode_image(square, opts.encoding, opts.quality, bgr=True)
    return fmt.decode_image({"image": encoded, "shape": list(square.shape), "source": name}, opts.encoding)


def predict(paths, model, normalize, meta, crop, *, tencrop=False, batch_size=32, progress=False,
            autocast=contextlib.nullcontext()):
    """Yields (path, probabilities or None, skip reason or None) per path, in the order of ``paths``. Files are
    read as the builder reads them (a FIFO or a folder is skipped, never waited for)."""
    opts = record_options(meta)
    files = FileSource("", list(paths), [0] * len(paths), ["?"])
    device = next(model.parameters()).device
    pending, batch = [], []  # pending: (path, index into batch or a skip reason), in input order

    def flush():
        if batch:
            x = torch.from_numpy(np.stack(batch)).to(device).permute(0, 3, 1, 2)
            probs = evaluation.softmax_of_crops(model, normalize, x, crop, tencrop=tencrop, autocast=autocast)
            probs = probs.cpu().numpy()
        for path, what in pending:
            if isinstance(what, str):
                yield path, None, what
            else:
                yield path, probs[what], None
        pending.clear()
        batch.clear()

    bar = tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for path, data in zip(paths, files.load(range(len(paths)))):
        bar.update()
        try:
            batch.append(prepare(data, opts, path))  # a MissingFile (unreadable, a FIFO) is a SkipImage here
            pending.append((path, len(batch) - 1))
        except image_ops.SkipImage as skip:
            pending.append((path, str(skip)))
        if len(batch) == batch_size:
            yield from flush()
    yield from flush()
    bar.close()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m alexnet.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="an image, a folder of images, or a text file listing image paths")
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint (best.pt or last.pt)")
    p.add_argument("--tencrop", action="store_true", help="average the softmax of the paper's ten crops")
    p.add_argument("--top", type=int, default=5, help="how many classes to print per image")
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    args = p.parse_args(argv)
    if args.top < 1 or args.batch_size < 1:
        raise PredictError("--top and --batch-size must be at least 1")
    paths = inputs(args.target)
    device = pick_device(args.device, "--device")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")  # as evaluate.py
    model, normalize, ckpt = evaluation.load_model(args.checkpoint, device)
    meta, crop = ckpt["meta"], ckpt["config"]["data"]["crop"]
    if args.tencrop and crop > meta["size"]:
        raise PredictError(f"{args.checkpoint}: crop {crop} is larger than the split's size {meta['size']}")
    classes, names = meta["classes"], meta.get("class_names") or meta["classes"]
    if "preprocess" not in meta:
        print(f"warning: {args.checkpoint} predates checkpoints that record how their split was packed; assuming "
              "the builder's defaults (JPEG quality 90, not --exact)", file=sys.stderr)
    top = min(args.top, len(classes))
    skipped = 0
    for raw_path, probs, reason in predict(paths, model, normalize, meta, crop, tencrop=args.tencrop,
                                           batch_size=args.batch_size, progress=len(paths) > 1 and not args.json,
                                           autocast=autocast):
        path = printable(raw_path)
        if reason is not None:
            skipped += 1
            if args.json:
                print(json.dumps({"image": path, "skipped": reason}, ensure_ascii=False))
            else:
                print(f"{path}: skipped ({reason})")
            continue
        best = np.argsort(-probs)[:top]
        if args.json:
            print(json.dumps({"image": path, "top": [{"class": classes[k], "name": names[k],
                                                      "probability": float(probs[k])} for k in best]},
                             ensure_ascii=False))
        else:
            shown = ", ".join(f"{names[k]} {100 * probs[k]:.1f}%" for k in best)
            print(f"{path}: {shown}")
    if skipped and not args.json:
        print(f"{skipped} of {len(paths)} skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main, (PredictError, CheckpointError, evaluation.EvaluationError, RunError, fmt.FormatError))
