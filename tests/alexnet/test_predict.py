"""alexnet.predict against evaluate.py on the same images: the records of a packed split, and their source files."""
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from datasets import LMDBDataset
from tests.conftest import ROOT, run_cli


def evaluate_probs(trained, tiny, tmp_path, tencrop):
    out = tmp_path / f"p{int(tencrop)}.h5"
    subprocess.run([sys.executable, "evaluate.py", "--checkpoint", trained / "last.pt", "--save-probs", out,
                    *(["--tencrop"] if tencrop else [])], cwd=ROOT, check=True, capture_output=True, timeout=600)
    with h5py.File(out) as f:
        return f["probs"][()]


def predict_json(*args):
    proc = run_cli("alexnet.predict", *args, "--json")
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("tencrop", [False, True])
def test_predict_on_source_files_equals_evaluate_on_their_records(trained, tiny, tmp_path, tencrop):
    """The source image of a packed record, predicted from its file, gets evaluate.py's probabilities for the
    record: the same decode, square, encoding, crops and normalisation."""
    probs = evaluate_probs(trained, tiny, tmp_path, tencrop)
    ds = LMDBDataset(tiny / "val")
    picks = [0, 7, 31, 59]
    listing = tmp_path / "list.txt"
    sources = [ds.records([i])[0]["source"] for i in picks]
    listing.write_text("".join(f"{tiny / 'images' / 'val' / s}\n" for s in sources))
    got = predict_json(listing, "--checkpoint", trained / "last.pt", "--top", 10, *(["--tencrop"] if tencrop else []))
    classes = ds.classes
    for i, row in zip(picks, got):
        p = np.zeros(len(classes))
        for entry in row["top"]:
            p[classes.index(entry["class"])] = entry["probability"]
        np.testing.assert_allclose(p, probs[i], rtol=1e-4, atol=1e-6)


def test_odd_and_broken_inputs_get_the_builders_treatment(trained, tiny, tmp_path, rng):
    rgb = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    good = (tmp_path / "cmyk.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[:len(good) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    rows = {os.path.basename(r["image"]): r for r in predict_json(tmp_path, "--checkpoint", trained / "last.pt")}
    assert len(rows["cmyk.jpg"]["top"]) == 5 and len(rows["gray.png"]["top"]) == 5
    assert rows["cut.jpg"]["skipped"].startswith("truncated JPEG") and rows["empty.jpg"]["skipped"].startswith("empty")
    text = run_cli("alexnet.predict", tmp_path / "gray.png", "--checkpoint", trained / "last.pt", "--top", 2).stdout
    assert text.startswith(f"{tmp_path / 'gray.png'}: ") and text.count("%") == 2
    for bad, message in ((tmp_path / "nope", "no such file"), (tmp_path / "cut.jpg", None)):
        proc = run_cli("alexnet.predict", bad, "--checkpoint", trained / "nope.pt", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and (message or "nope.pt") in proc.stderr


def test_folders_lists_and_odd_files_do_not_hang_or_reorder(trained, tmp_path, rng):
    """A symlink loop lists each image once, a FIFO named like an image is skipped (never waited for), results
    come in input order whatever is skipped, and a list whose first path starts like a BMP is still a list."""
    folder = tmp_path / "f"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(folder / "a.jpg")
    os.symlink(".", folder / "self")
    os.symlink(".", folder / "again")
    os.mkfifo(folder / "pipe.jpg")
    proc = subprocess.run([sys.executable, "-m", "alexnet.predict", folder, "--checkpoint", trained / "last.pt",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and [os.path.basename(r["image"]) for r in rows] == ["a.jpg", "pipe.jpg"]
    assert "not a regular file" in rows[1]["skipped"]
    (tmp_path / "BMW").mkdir()
    shutil.copy(folder / "a.jpg", tmp_path / "BMW" / "x.jpg")
    (tmp_path / "cars.txt").write_text("BMW/x.jpg\nmissing.jpg\nBMW/x.jpg 3\n")
    rows = predict_json(tmp_path / "cars.txt", "--checkpoint", trained / "last.pt", "--batch-size", 2)
    assert [os.path.basename(r["image"]) for r in rows] == ["x.jpg", "missing.jpg", "x.jpg"]
    assert "top" in rows[0] and "skipped" in rows[1] and rows[2]["top"] == rows[0]["top"]
