"""bench.gpu_check runs on the CPU at small sizes, so the GPU session's one command cannot rot."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "check.md"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--small", "--out", str(out), "--dir",
                           str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = out.read_text()
    for part in ("## (a) Race", "## (b) Loader to device", "## (c) Benchmarks", "### bench.model",
                 "### bench.train_step", "### bench.evaluate", "## (d) train.py", "### evaluate.py --tencrop",
                 "## (e) DDP", "all checks passed"):
        assert part in report, part
    assert "| consumer stream busy | 0 |" in report
    assert "falls" in report and "DOES NOT FALL" not in report


def test_gpu_check_names_a_missing_package(tmp_path):
    """The GPU machine lacks lmdb and zlib-ng until their wheels travel: the command says so, installs nothing."""
    blocker = tmp_path / "lmdb.py"
    blocker.write_text("raise ImportError('no lmdb here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "x.md")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "missing Python package(s): lmdb" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.md").exists()


def test_nothing_but_the_loader_copies_loader_output_to_a_device():
    """The loader owns the hand-off: no other module calls .to(..., non_blocking=True) on its batches."""
    offenders = []
    for top in ("alexnet", "datasets", "preprocess", "bench", "train.py", "evaluate.py"):
        path = os.path.join(ROOT, top)
        files = [path] if path.endswith(".py") else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                                                     if f.endswith(".py")]
        for f in files:
            if f.endswith(os.path.join("datasets", "device.py")):
                continue
            if "non_blocking" in open(f, encoding="utf-8").read():
                offenders.append(os.path.relpath(f, ROOT))
    assert not offenders
