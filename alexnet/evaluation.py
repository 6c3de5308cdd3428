"""The paper's test (Sec. 4.1, 6): softmax over the centre crop or the ten patches, averaged over patches and
over the networks of an ensemble; top-k error; saved probabilities that combine without running a model."""
import contextlib
import os

import h5py
import numpy as np
import torch

from alexnet import checkpoint, config, run
from alexnet.checkpoint import CheckpointError
from datasets import Normalize, cli, format as fmt, ten_crop

MAX_CROPS_PER_FORWARD = 256  # bounds ten-crop memory whatever the batch size


class EvaluationError(ValueError):
    pass


def load_model(path, device):
    """(model in eval mode, Normalize, checkpoint) from a train.py checkpoint."""
    ckpt = checkpoint.load(path)
    cfg = ckpt["config"]
    meta = ckpt["meta"]
    try:
        resolved = config.from_dict(cfg, path)
        with torch.device("meta"):  # the shapes its config makes, before allocating anything (crop 2000: 15.6 GB)
            shapes = {k: tuple(v.shape) for k, v in run.model(resolved, len(meta["classes"])).state_dict().items()}
    except (config.ConfigError, ValueError) as exc:
        raise CheckpointError(f"{path}: its config cannot make a model ({exc}); the checkpoint is damaged or was "
                              "edited") from None
    for key, want in shapes.items():
        got = ckpt["model"].get(key)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
            raise CheckpointError(f"{path}: its weights do not fit its config: {key} is "
                                  f"{tuple(got.shape) if isinstance(got, torch.Tensor) else 'missing'}, the config "
                                  f"(data.crop {resolved.data.crop}, model.groups {resolved.model.groups}) makes "
                                  f"{want}; the checkpoint is damaged or was edited")
    model = run.model(resolved, len(meta["classes"]))
    model.load_state_dict(ckpt["model"])
    model = model.to(device, memory_format=torch.channels_last).eval()
    mean_image = ckpt.get("mean_image")
    if mean_image is not None:
        if not isinstance(mean_image, torch.Tensor) or tuple(mean_image.shape) != (meta["size"], meta["size"], 3):
            raise CheckpointError(f"{path}: its mean_image is not a {meta['size']}x{meta['size']}x3 tensor (the "
                                  "size of its training split); the checkpoint is damaged")
        mean_image = mean_image.numpy()
    elif cfg["data"]["mean"] == "image":
        mean_image = _split_mean_image(path, cfg["data"]["train"], meta)
    normalize = Normalize(meta, pca_std=0.0, mean=cfg["data"]["mean"], std=cfg["data"]["std"],
                          mean_image=mean_image).to(device).eval()
    return model, normalize, ckpt


def _split_mean_image(path, train, meta):
    """The mean image of a checkpoint written before checkpoints carried it: read from its training split."""
    file = os.path.join(train, meta.get("mean_image") or fmt.MEAN_IMAGE_FILE)
    need = (f"{path}: trained with data.mean=image by a version whose checkpoints did not carry the mean image, so "
            f"it needs {file}, which")
    try:
        image = fmt.read_mean_image(train, meta)
    except (OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{need} cannot be read ({exc or type(exc).__name__}); put the training split's "
                              "mean_image.npy there") from None
    if image is None or image.shape != (meta["size"], meta["size"], 3):
        raise CheckpointError(f"{need} is {None if image is None else image.shape}, not the {meta['size']}x"
                              f"{meta['size']}x3 of the split it was trained on; put that split's mean_image.npy there")
    return image


def check_classes(ckpt, path, classes, data):
    mine = ckpt["meta"]["classes"]
    if mine != classes:
        only_ckpt = [c for c in mine if c not in classes][:3]
        only_data = [c for c in classes if c not in mine][:3]
        raise EvaluationError(f"{path}: its {len(mine)} classes differ from the {len(classes)} of {data} "
                              f"(only in the checkpoint: {only_ckpt}; only in the data: {only_data}; or another order)")


def check_size(ckpt, path, size, data, *, tencrop):
    """The split must have the size the network was trained on: its crops of another scale score a plausible
    but wrong number."""
    trained = ckpt["meta"].get("size")
    if trained is not None and trained != size:
        raise EvaluationError(f"{data}: its images are {size}x{size}, {path} was trained on {trained}x{trained} "
                              f"(crops of {ckpt['config']['data']['crop']}); pack the test split with --size {trained}")
    if tencrop and ckpt["config"]["data"]["crop"] > size:
        raise EvaluationError(f"{data}: {size}x{size} images are smaller than {path}'s crop "
                              f"{ckpt['config']['data']['crop']}")


@torch.no_grad()
def softmax_of_crops(model, normalize, images, crop, *, tencrop, autocast):
    """B×C float32 softmax of a uint8 [B, 3, S, S] batch: its centre crop's (a no-op where S is the crop), or
    averaged over the paper's ten patches. The one test procedure of evaluate.py and alexnet.predict."""
    if tencrop:
        patches = ten_crop(images, crop).flatten(0, 1)  # [B*10, 3, crop, crop], image-major
    else:
        top, left = (images.shape[-2] - crop) // 2, (images.shape[-1] - crop) // 2
        patches = images[..., top:top + crop, left:left + crop]
    out = []
    for chunk in patches.split(MAX_CROPS_PER_FORWARD):
        with autocast:
            logits = model(normalize(chunk))
        out.append(torch.softmax(logits.float(), dim=1))
    p = torch.cat(out)
    return p.view(len(images), 10, -1).mean(dim=1) if tencrop else p


def predict(model, normalize, loader, *, crop, tencrop, autocast):
    """(N×C float32 softmax, averaged over the ten patches when ``tencrop``; N labels), in record order."""
    probs, labels = [], []
    for images, y in loader:  # on ``device`` already: the loader copies ahead of use
        probs.append(softmax_of_crops(model, normalize, images, crop, tencrop=tencrop, autocast=autocast).cpu())
        labels.append(y.cpu())
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def topk_error(probs, labels, k):
    """Fraction of images whose label is not among the k most probable classes."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(1.0 - (top == labels[:, None]).any(axis=1).mean())


def per_class_accuracy(probs, labels, classes):
    pred = probs.argmax(axis=1)
    return [(c, int((labels == i).sum()), float((pred[labels == i] == i).mean()) if (labels == i).any() else float("nan"))
            for i, c in enumerate(classes)]


def save_probs(path, probs, labels, classes, checkpoints, identity, crops):
    """HDF5: probs (N×C float32), labels, class names, the checkpoints used, and the split's identity."""
    with written(path), fmt.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("probs", data=probs.astype(np.float32), compression="gzip")
        f["labels"] = labels.astype(np.int64)
        f["classes"] = np.array(classes, dtype=h5py.string_dtype())
        f["checkpoints"] = np.array([os.path.abspath(c) for c in checkpoints], dtype=h5py.string_dtype())
        f.attrs["split"] = identity["split"]
        f.attrs["split_digest"] = identity["digest"]
        f.attrs["crops"] = crops


@contextlib.contextmanager
def written(path):
    """An OSError while writing ``path`` (a full disk: HDF5 and csv name no file) becomes one naming it."""
    try:
        yield
    except OSError as exc:
        raise EvaluationError(f"{path}: {cli.explain(exc)}") from None


def load_probs(path):
    try:
        with h5py.File(path, "r") as f:
            return {"probs": f["probs"][()], "labels": f["labels"][()],
                    "classes": [c.decode() if isinstance(c, bytes) else c for c in f["classes"][()]],
                    "checkpoints": [c.decode() if isinstance(c, bytes) else c for c in f["checkpoints"][()]],
                    "split": f.attrs["split"], "digest": f.attrs["split_digest"], "crops": int(f.attrs["crops"])}
    except (OSError, KeyError) as exc:
        raise EvaluationError(f"{path}: not a file written by evaluate.py --save-probs ({exc})") from None


def combine_saved(paths):
    """Average the saved softmax of several files, checking they cover the same images in the same order."""
    saved = [load_probs(p) for p in paths]
    first = saved[0]
    for path, s in zip(paths[1:], saved[1:]):
        for key, what in (("digest", "images (another split, or another order)"), ("classes", "classes")):
            if s[key] != first[key]:
                raise EvaluationError(f"{path}: its {what} differ from {paths[0]}'s ({s['split']} vs {first['split']})")
        if not np.array_equal(s["labels"], first["labels"]):
            raise EvaluationError(f"{path}: its labels differ from {paths[0]}'s")
    probs = np.mean([s["probs"] for s in saved], axis=0)
    return probs, first["labels"], first["classes"], [c for s in saved for c in s["checkpoints"]], first


def split_identity(dataset):
    """Which images, in which order: the split's path and a digest of its meta.json (which lists its shards,
    record counts, skipped inputs, statistics and build), unique to one build of one split."""
    import hashlib
    with open(os.path.join(dataset.root, fmt.META_FILE), "rb") as f:
        return {"split": os.path.abspath(dataset.root), "digest": hashlib.sha256(f.read()).hexdigest()}


__all__ = ["CheckpointError", "EvaluationError", "load_model", "predict", "topk_error", "combine_saved",
           "save_probs", "split_identity", "per_class_accuracy", "check_classes", "check_size"]
