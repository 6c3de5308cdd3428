"""Export a trained network for serving:
``python -m alexnet.export --checkpoint best.pt --format torchscript|onnx|pt2 OUT``.

The exported program takes what a camera or an image library gives: uint8 RGB images, NCHW ``[B, 3, crop,
crop]`` (``crop`` is the checkpoint's ``data.crop``, 224 for the paper; B is free), already rescaled and
cropped as ``alexnet.predict`` does; and returns float32 logits ``[B, classes]``, in the checkpoint's class
order (softmax them for probabilities). The checkpoint's normalisation (mean RGB or mean image, and std when
the run used it) is folded in front, so nothing else is needed to serve it. ``OUT`` is written atomically;
``OUT.json`` beside it names the input layout, the classes (and their names) and the checkpoint.
"""
import argparse
import json
import os
import sys

import torch
from torch import nn

from alexnet import evaluation
from alexnet.checkpoint import CheckpointError
from datasets import cli, format as fmt

FORMATS = ("torchscript", "onnx", "pt2")


class ExportError(ValueError):
    """An export that cannot be made here; the message says what to install or change."""


class Deployable(nn.Module):
    """uint8 RGB [B, 3, crop, crop] -> float32 logits [B, classes]: the checkpoint's normalisation, then
    the network (eval mode: no dropout, no colour shift)."""

    def __init__(self, model, normalize, crop):
        super().__init__()
        self.model = model.eval()
        mean = normalize._mean_for(crop, crop)
        self.register_buffer("offset", (-mean * normalize.scale).float().contiguous())
        self.register_buffer("scale", normalize.scale.float().contiguous())

    def forward(self, images):
        return self.model(torch.addcmul(self.offset, images.float(), self.scale)).float()


def deployable(checkpoint_path):
    """(Deployable on the CPU, checkpoint) of a train.py checkpoint."""
    model, normalize, ckpt = evaluation.load_model(checkpoint_path, torch.device("cpu"))
    model = model.to(memory_format=torch.contiguous_format)
    return Deployable(model, normalize, ckpt["config"]["data"]["crop"]).eval(), ckpt


def export(checkpoint_path, out, kind):
    """Write the checkpoint's network as ``kind`` to ``out`` (and its description to ``out.json``)."""
    if kind not in FORMATS:
        raise ExportError(f"--format {kind}: one of {', '.join(FORMATS)}")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ExportError(f"{out}: its folder {parent} does not exist; create it first")
    for path in (out, f"{out}.json"):
        if os.path.isdir(path):
            raise ExportError(f"{path}: is a folder; give a file name")
    net, ckpt = deployable(checkpoint_path)
    crop = ckpt["config"]["data"]["crop"]
    example = torch.zeros(2, 3, crop, crop, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    meta = ckpt["meta"]
    description = {
        "format": kind, "checkpoint": os.path.abspath(checkpoint_path),
        "input": {"dtype": "uint8", "layout": "NCHW", "channels": "RGB", "shape": ["batch", 3, crop, crop],
                  "prepare": "as alexnet.predict: the builder's decode, shorter side to split_size, centre square, "
                             "encoded and decoded as split_encoding at split_quality, then the centre crop",
                  "split_size": meta["size"], "split_encoding": meta["encoding"], "split_quality": meta.get("quality"),
                  "split_preprocess": meta.get("preprocess")},
        "output": {"dtype": "float32", "shape": ["batch", len(meta["classes"])], "meaning": "logits"},
        "classes": meta["classes"], "class_names": meta.get("class_names")}
    # the two files appear together or not at all: both written to temporary names, renamed at the end
    with torch.no_grad(), fmt.atomic_path(f"{out}.json") as tmp_json, fmt.atomic_path(out) as tmp:
        with open(tmp_json, "w", encoding="utf-8") as f:
            json.dump(description, f, indent=1, ensure_ascii=False)
        if kind == "torchscript":
            torch.jit.save(torch.jit.trace(net, example), tmp)
        elif kind == "pt2":
            torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: batch},)), tmp)
        else:
            try:
                import onnx  # noqa: F401 (torch.onnx needs it, and says so less clearly)
                import onnxscript  # noqa: F401
            except ImportError:
                raise ExportError("--format onnx needs the onnx and onnxscript packages: pip install onnx onnxscript "
                                  "(or pip install 'alexnet-lmdb[onnx]'); torchscript and pt2 need nothing more") from None
            torch.onnx.export(net, (example,), tmp, input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), dynamo=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m alexnet.export", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the file to write (e.g. alexnet.pt, alexnet.onnx, alexnet.pt2)")
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint")
    p.add_argument("--format", choices=FORMATS, default="torchscript")
    args = p.parse_args(argv)
    export(args.checkpoint, args.out, args.format)
    print(f"{args.out}: {args.format}, uint8 RGB NCHW in, logits out (described in {args.out}.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main, (ExportError, CheckpointError, evaluation.EvaluationError, fmt.FormatError))
