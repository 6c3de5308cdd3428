"""evaluate.py against independent computations: hand-sliced ten crops, hand normalisation, hand top-k."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from alexnet import evaluation
from alexnet.model import AlexNet
from datasets import LMDBDataset
from tests.conftest import ROOT


def evaluate(*args, check=True):
    proc = subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def test_tencrop_against_hand_sliced_patches(trained, tiny, tmp_path):
    evaluate("--checkpoint", trained / "last.pt", "--tencrop", "--save-probs", tmp_path / "p.h5", "--json")
    with h5py.File(tmp_path / "p.h5") as f:
        probs, labels = f["probs"][()], f["labels"][()]
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    model = AlexNet(10, image_size=64, init="kaiming")
    model.load_state_dict(ckpt["model"])
    model.eval()
    mean, std = np.array(ckpt["meta"]["mean_rgb"]), np.array(ckpt["meta"]["std_rgb"])
    ds = LMDBDataset(tiny / "val")
    for i in (0, 17, 59):
        image, label = ds[i]  # 72×72×3 RGB
        corners = [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4)]
        patches = [image[t:t + 64, l:l + 64] for t, l in corners]
        patches += [p[:, ::-1] for p in patches]
        x = torch.from_numpy(np.stack([(p - mean) / std for p in patches]).transpose(0, 3, 1, 2).astype(np.float32))
        with torch.no_grad():
            expected = torch.softmax(model(x), dim=1).mean(0).numpy()
        np.testing.assert_allclose(probs[i], expected, rtol=1e-3, atol=1e-5)
        assert labels[i] == label


def test_topk_error_by_hand():
    probs = np.array([[0.1, 0.5, 0.2, 0.2], [0.7, 0.1, 0.1, 0.1], [0.3, 0.3, 0.4, 0.0]])
    labels = np.array([2, 0, 1])
    assert evaluation.topk_error(probs, labels, 1) == pytest.approx(2 / 3)  # only image 1 is right
    assert evaluation.topk_error(probs, labels, 2) == pytest.approx(1 / 3)  # image 0: 0.2 ties, stable order -> 2nd
    assert evaluation.topk_error(probs, labels, 4) == 0.0


def test_ensembles(trained, tmp_path):
    a, b = trained / "best.pt", trained / "last.pt"
    one = json.loads(evaluate("--checkpoint", a, "--json", "--save-probs", tmp_path / "a.h5").stdout.splitlines()[-1])
    assert set(one) == {"top1_error", "top5_error", "images", "crops", "models"}
    assert one["images"] == 60 and one["crops"] == 1 and one["models"] == 1
    evaluate("--checkpoint", a, "--checkpoint", a, "--save-probs", tmp_path / "aa.h5")
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "aa.h5") as faa:
        np.testing.assert_allclose(faa["probs"][()], fa["probs"][()], rtol=1e-6)  # an ensemble of one model
    evaluate("--checkpoint", b, "--save-probs", tmp_path / "b.h5")
    both = json.loads(evaluate("--checkpoint", a, "--checkpoint", b, "--json", "--save-probs",
                               tmp_path / "ab.h5").stdout.splitlines()[-1])
    combined = json.loads(evaluate("--ensemble-from", tmp_path / "a.h5", tmp_path / "b.h5", "--json").stdout.splitlines()[-1])
    assert combined["models"] == both["models"] == 2
    assert combined["top1_error"] == pytest.approx(both["top1_error"]) and combined["images"] == both["images"]
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb, h5py.File(tmp_path / "ab.h5") as fab:
        np.testing.assert_allclose(fab["probs"][()], (fa["probs"][()] + fb["probs"][()]) / 2, rtol=1e-5, atol=1e-7)


def test_bad_inputs_name_the_file(trained, tiny, tmp_path):
    (tmp_path / "cut.pt").write_bytes((trained / "last.pt").read_bytes()[:5000])
    proc = evaluate("--checkpoint", tmp_path / "cut.pt", check=False)
    assert proc.returncode == 2 and "cut.pt: not a readable checkpoint" in proc.stderr
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    ckpt["meta"]["classes"] = ckpt["meta"]["classes"][::-1]
    torch.save(ckpt, tmp_path / "other.pt")
    proc = evaluate("--checkpoint", tmp_path / "other.pt", "--data", tiny / "val", check=False)
    assert proc.returncode == 2 and "other.pt: its 10 classes differ" in proc.stderr
    evaluate("--checkpoint", trained / "last.pt", "--save-probs", tmp_path / "val.h5")
    evaluate("--checkpoint", trained / "last.pt", "--data", tiny / "train", "--save-probs", tmp_path / "train.h5")
    proc = evaluate("--ensemble-from", tmp_path / "val.h5", tmp_path / "train.h5", check=False)
    assert proc.returncode == 2 and "train.h5: its images" in proc.stderr


def test_a_split_of_another_size_is_refused_naming_both(trained, tiny, tmp_path):
    from preprocess.build_lmdb import build
    other = tmp_path / "val144"
    build(str(tiny / "images" / "val"), str(other), size=144, workers=1, quiet=True, classes_from=str(tiny / "train"))
    for extra in ([], ["--tencrop"]):
        proc = evaluate("--checkpoint", trained / "last.pt", "--data", other, *extra, check=False)
        assert proc.returncode == 2 and "144x144" in proc.stderr and "72x72" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_output_paths_and_numbers_are_checked_before_the_evaluation(trained, tmp_path):
    for args, message in ((["--save-probs", tmp_path / "nowhere" / "p.h5"], "does not exist"),
                          (["--per-class", tmp_path], "is a folder"),
                          (["--batch-size", 0], "--batch-size 0"), (["--workers", -1], "--workers -1")):
        proc = evaluate("--checkpoint", trained / "last.pt", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "images/s" not in proc.stdout, proc.stderr


def test_save_probs_on_a_full_disk_says_so_and_leaves_nothing(trained, tiny, small_disk):
    mnt = small_disk("64k")
    subprocess.run(["dd", "if=/dev/zero", f"of={mnt / 'filler'}", "bs=4096"], capture_output=True)  # to the last byte
    proc = evaluate("--checkpoint", trained / "last.pt", "--data", tiny / "val", "--save-probs", mnt / "p.h5",
                    check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "no space left" in err and "p.h5" in err and "Traceback" not in err, err
    assert sorted(os.listdir(mnt)) == ["filler"]
