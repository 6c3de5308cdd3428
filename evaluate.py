"""Test as in the paper: ``python evaluate.py [--checkpoint PATH ...] [--tencrop] [--json]``.

The centre crop, or with --tencrop the four corner and centre crops of each image and their horizontal
reflections, softmax averaged over the ten (Sec. 4.1); several --checkpoint options average the softmax
of the networks (an ensemble, each with its own normalisation). --save-probs keeps the averaged softmax in
HDF5; --ensemble-from combines such files without running any model.
"""
import argparse
import csv
import json
import os
import time

import torch

from alexnet import config, evaluation
from alexnet.checkpoint import CheckpointError
from alexnet.evaluation import EvaluationError
from alexnet.run import RunError, open_split, pick_device
from datasets import cli, format as fmt, make_loader


def report(name, probs, labels, classes, *, crops, models, images_per_s, per_class_csv, as_json, class_names=None):
    top1, top5 = evaluation.topk_error(probs, labels, 1), evaluation.topk_error(probs, labels, min(5, len(classes)))
    print(f"| model | top-1 error | top-5 error |\n|---|---|---|\n| {name} | {100 * top1:.2f}% | {100 * top5:.2f}% |")
    speed = f", {images_per_s:.0f} images/s" if images_per_s else ""
    print(f"{len(labels)} images, {crops} crop{'s' if crops > 1 else ''}, {models} model{'s' if models > 1 else ''}{speed}")
    if per_class_csv:
        with evaluation.written(per_class_csv), fmt.atomic_path(per_class_csv) as tmp, \
                open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            rows = evaluation.per_class_accuracy(probs, labels, classes)
            if class_names:  # the split's human-readable names (meta.json's class_names), last
                w.writerow(["class", "images", "top1_accuracy", "name"])
                w.writerows(row + (n,) for row, n in zip(rows, class_names))
            else:
                w.writerow(["class", "images", "top1_accuracy"])
                w.writerows(rows)
        print(f"per-class accuracy: {per_class_csv}")
    if as_json:
        print(json.dumps({"top1_error": top1, "top5_error": top5, "images": int(len(labels)), "crops": crops,
                          "models": models}))


def check_arguments(args):
    """What can be checked before a long evaluation: numbers in range, and that the output files can be written."""
    for name, least in (("batch_size", 1), ("workers", 0)):
        if getattr(args, name) < least:
            raise EvaluationError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {least}")
    for flag, path in (("--save-probs", args.save_probs), ("--per-class", args.per_class)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise EvaluationError(f"{flag} {path}: is a folder; give a file name")
        if not os.path.isdir(folder):
            raise EvaluationError(f"{flag} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise EvaluationError(f"{flag} {path}: the folder {folder} is not writable")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", help="a train.py checkpoint; repeat for an ensemble "
                                                         "(default: best.pt in --config's out_dir)")
    p.add_argument("--config", default="configs/base.yaml", help="where the default checkpoint comes from")
    p.add_argument("--data", help="packed split to test on (default: the first checkpoint's data.val)")
    p.add_argument("--tencrop", action="store_true", help="the paper's ten patches, softmax averaged")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (ten-crop runs at most "
                                                              f"{evaluation.MAX_CROPS_PER_FORWARD} crops at once)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--save-probs", metavar="FILE.h5", help="write the averaged softmax, labels and classes")
    p.add_argument("--ensemble-from", nargs="+", metavar="FILE.h5", help="combine saved files; runs no model")
    p.add_argument("--per-class", metavar="FILE.csv", help="per-class accuracy (default: beside the first "
                                                           "checkpoint or saved file)")
    p.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    args = p.parse_args(argv)
    check_arguments(args)

    if args.ensemble_from:
        probs, labels, classes, ckpts, first = evaluation.combine_saved(args.ensemble_from)
        csv_path = args.per_class or os.path.splitext(args.ensemble_from[0])[0] + "-ensemble-per-class.csv"
        report(f"ensemble of {len(args.ensemble_from)} files", probs, labels, classes, crops=first["crops"],
               models=len(ckpts), images_per_s=None, per_class_csv=csv_path, as_json=args.json)
        return 0

    paths = args.checkpoint or [os.path.join(config.load(args.config).out_dir, "best.pt")]
    device = pick_device(args.device, "--device")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    models = [evaluation.load_model(path, device) for path in paths]
    data = args.data or models[0][2]["config"]["data"]["val"]
    dataset = open_split(data, "--data")
    for path, (_, _, ckpt) in zip(paths, models):
        evaluation.check_classes(ckpt, path, dataset.classes, data)
        evaluation.check_size(ckpt, path, dataset.meta["size"], data, tencrop=args.tencrop)
    t0 = time.perf_counter()
    total = None
    for path, (model, normalize, ckpt) in zip(paths, models):
        crop = ckpt["config"]["data"]["crop"]
        loader = make_loader(dataset, batch_size=args.batch_size, train=False, workers=args.workers,
                             crop=dataset.meta["size"] if args.tencrop else crop, device=device)
        probs, labels = evaluation.predict(model, normalize, loader, crop=crop, tencrop=args.tencrop,
                                           autocast=autocast)
        total = probs if total is None else total + probs
    probs = total / len(models)
    images_per_s = len(labels) * len(models) / (time.perf_counter() - t0)
    crops = 10 if args.tencrop else 1
    if args.save_probs:
        evaluation.save_probs(args.save_probs, probs, labels, dataset.classes, paths,
                              evaluation.split_identity(dataset), crops)
    csv_path = args.per_class or os.path.join(os.path.dirname(os.path.abspath(paths[0])),
                                              f"per-class-{'tencrop' if args.tencrop else 'centre'}.csv")
    name = os.path.basename(paths[0]) if len(paths) == 1 else f"ensemble of {len(paths)}"
    report(name, probs, labels, dataset.classes, crops=crops, models=len(paths), images_per_s=images_per_s,
           per_class_csv=csv_path, as_json=args.json, class_names=dataset.meta.get("class_names"))
    return 0


if __name__ == "__main__":
    cli.run(main, (config.ConfigError, RunError, CheckpointError, EvaluationError, fmt.FormatError))
