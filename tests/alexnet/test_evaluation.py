"""alexnet.evaluation.load_model: a checkpoint is enough to use the network, without the data it was trained on."""
import os
import subprocess
import sys

import h5py
import numpy as np
import torch

from tests.conftest import ROOT, run_cli


def probs_of(checkpoint, data, out):
    proc = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", checkpoint, "--data", data,
                           "--save-probs", out], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        return proc
    with h5py.File(out) as f:
        return f["probs"][()]


def test_a_mean_image_run_needs_no_training_split_to_evaluate_predict_or_export(tiny, tmp_path):
    """``data.mean=image`` subtracts the training split's mean image: the checkpoint carries it, so evaluate,
    predict and export work where the training split is not (another machine, a deleted scratch disk), with the
    same probabilities. An older checkpoint without it says which file it needs."""
    from preprocess.build_lmdb import build
    train = tmp_path / "train"
    build(str(tiny / "images" / "train"), str(train), size=72, workers=2, quiet=True, mean_image=True)
    run = tmp_path / "run"
    subprocess.run([sys.executable, "train.py", "configs/demo.yaml", f"data.train={train}", f"data.val={tiny / 'val'}",
                    "data.mean=image", f"out_dir={run}", "train.epochs=1", "train.batch_size=64"],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    np.testing.assert_array_equal(ckpt["mean_image"].numpy(), np.load(train / "mean_image.npy"))
    old = dict(ckpt)
    del old["mean_image"]
    torch.save(old, run / "old.pt")
    with_split = probs_of(run / "last.pt", tiny / "val", tmp_path / "a.h5")

    os.rename(train, tmp_path / "elsewhere")
    np.testing.assert_array_equal(probs_of(run / "last.pt", tiny / "val", tmp_path / "b.h5"), with_split)
    image = next((tiny / "images" / "val").rglob("*.jpg"))
    assert "%" in run_cli("alexnet.predict", image, "--checkpoint", run / "last.pt").stdout
    run_cli("alexnet.export", tmp_path / "m.pt", "--checkpoint", run / "last.pt", "--format", "torchscript")

    proc = probs_of(run / "old.pt", tiny / "val", tmp_path / "c.h5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(run / "old.pt") in proc.stderr and str(train / "mean_image.npy") in proc.stderr
    os.rename(tmp_path / "elsewhere", train)
    np.testing.assert_array_equal(probs_of(run / "old.pt", tiny / "val", tmp_path / "d.h5"), with_split)
    good = (train / "mean_image.npy").read_bytes()
    (train / "mean_image.npy").write_bytes(b"")
    proc = probs_of(run / "old.pt", tiny / "val", tmp_path / "e.h5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "cannot be read" in proc.stderr
    np.save(train / "mean_image.npy", np.zeros((80, 80, 3), np.float32))
    proc = probs_of(run / "old.pt", tiny / "val", tmp_path / "f.h5")
    assert proc.returncode == 2 and "is (80, 80, 3), not the 72x72x3" in proc.stderr
    (train / "mean_image.npy").write_bytes(good)
    bad = dict(ckpt, mean_image=ckpt["mean_image"][:70])
    torch.save(bad, run / "bad.pt")
    proc = probs_of(run / "bad.pt", tiny / "val", tmp_path / "g.h5")
    assert proc.returncode == 2 and "damaged" in proc.stderr and str(run / "bad.pt") in proc.stderr
