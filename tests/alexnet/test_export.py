"""alexnet.export: the exported program's logits against the eager model's, on uint8 RGB batches."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from alexnet import evaluation
from tests.conftest import ROOT, run_cli


@pytest.mark.parametrize("kind", ["torchscript", "pt2", "onnx"])
def test_exported_logits_equal_the_eager_models(trained, tmp_path, kind):
    if kind == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed (pip install -e '.[test]'): the ONNX file cannot be run here")
    out = tmp_path / f"m.{kind}"
    run_cli("alexnet.export", out, "--checkpoint", trained / "last.pt", "--format", kind)
    info = json.loads((tmp_path / f"m.{kind}.json").read_text())
    crop = info["input"]["shape"][2]
    assert info["input"]["layout"] == "NCHW" and info["input"]["dtype"] == "uint8" and len(info["classes"]) == 10
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, crop, crop), dtype=np.uint8))
    model, normalize, _ = evaluation.load_model(trained / "last.pt", torch.device("cpu"))
    with torch.no_grad():
        expected = model(normalize(images)).float()
        if kind == "torchscript":
            got = torch.jit.load(out)(images)
        elif kind == "pt2":
            got = torch.export.load(out).module()(images)
        else:
            import onnxruntime
            got = torch.from_numpy(onnxruntime.InferenceSession(str(out)).run(None, {"images": images.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], got[1])  # three different images, three different answers


def test_export_errors_leave_nothing_behind(trained, tmp_path):
    proc = run_cli("alexnet.export", tmp_path / "nodir" / "m.pt", "--checkpoint", trained / "last.pt", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "m.pt.json").mkdir()
    proc = run_cli("alexnet.export", tmp_path / "m.pt", "--checkpoint", trained / "last.pt", check=False)
    assert proc.returncode == 2 and "m.pt.json: is a folder" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.pt.json"]  # no model without its description, no temporary file


def test_onnx_without_its_packages_says_what_to_install(trained, tmp_path):
    """Where onnx is not installed (an ``onnx.py`` that raises ImportError stands in for its absence), the
    export says what to install and writes nothing."""
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "onnx.py").write_text("raise ImportError('No module named onnx')\n")
    proc = subprocess.run([sys.executable, "-m", "alexnet.export", tmp_path / "m.onnx", "--checkpoint",
                           trained / "last.pt", "--format", "onnx"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path / "hide")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "pip install onnx onnxscript" in proc.stderr
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.json").exists()


CROP_2000 = ({"data": {"crop": 2000}}, "its weights do not fit its config: classifier.fc6.weight is (4096, 256), "
                                       "the config (data.crop 2000, model.groups 1) makes (4096, 952576)")


@pytest.mark.parametrize("edit,says,command", [
    (*CROP_2000, "alexnet.predict"),
    ({"data": {"crop": "big"}}, "its config cannot make a model", "alexnet.export"),
])
def test_a_hand_edited_checkpoint_is_refused_before_anything_is_built(trained, tmp_path, edit, says, command):
    """crop 2000 would make a 15.6 GB fc6 before the shapes were compared: the config is checked against the
    weights first, one line, exit 2, under a 2 GB address-space limit."""
    import resource
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    for section, values in edit.items():
        ckpt["config"][section].update(values)
    torch.save(ckpt, tmp_path / "edited.pt")
    import cv2
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((80, 80, 3), np.uint8))
    args = [tmp_path / "m.pt"] if command == "alexnet.export" else [tmp_path / "x.png"]
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 29, 4 << 29))  # noqa: E731
    proc = subprocess.run([sys.executable, "-m", command, *map(str, args), "--checkpoint", str(tmp_path / "edited.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and says in err and "Traceback" not in err, err[-2000:]
