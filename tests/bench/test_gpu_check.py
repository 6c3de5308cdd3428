"""bench.gpu_check: the whole check on the CPU within its budget, the budget and the time limits kept, what
the machine lacks installed from wheels, and the loader's ownership of the device hand-off."""
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from bench.gpu_check import runner
from tests.conftest import ROOT
from tests.datasets.conftest import coded_split  # noqa: F401 (a fixture)

CHECKS = ["setup", *(s.name for s in runner.STEPS)]


def run_check(tmp_path, *args, env=None, timeout=600):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--work",
                           str(tmp_path / "work"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return proc, report, out


@pytest.mark.slow
def test_every_check_runs_on_the_cpu_within_a_budget_of_120_s(tmp_path):
    """The whole check, end to end, within its budget. On a loaded machine the budget may cut the last checks
    short: those are skipped (and said), never failed, and the most important ones always run."""
    t0 = time.monotonic()
    proc, report, out = run_check(tmp_path, "--budget", "120")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert elapsed < 125, f"the check took {elapsed:.0f} s of a 120 s budget"
    assert [c["name"] for c in report["checks"]] == CHECKS
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert "failed" not in status.values(), status
    assert all(status[n] == "passed" for n in CHECKS[:7]), status  # set-up to evaluate
    assert all(c["status"] == "passed" or "budget" in c["why"] for c in report["checks"]), status
    md = (out / "report.md").read_text()
    assert "- torch: " in md and "- OpenCV: " in md and "decodes straight to RGB" in md
    race = next(c for c in report["checks"] if c["name"] == "race")["figures"]["rows"]
    assert race and all(r["mismatched"] == 0 and r["compared"] > 0 for r in race)
    train = next(c for c in report["checks"] if c["name"] == "train")["figures"]
    assert len(train["losses"]) == 3 and train["losses"][-1] < train["losses"][0]
    for c in report["checks"]:  # every check's whole output is kept
        if c["name"] != "setup" and c["status"] == "passed":
            assert (out / c["log"]).stat().st_size > 0, c["name"]


def test_the_race_comparison_sees_one_wrong_batch(coded_split):
    """The race check's comparison can fail: a copier that changes one pixel of one batch, or one label, makes
    one mismatched batch; a faithful copier none."""
    import torch

    from bench.gpu_check import race
    from datasets.device import Copier

    class Done:
        def query(self):
            return True

        def synchronize(self):
            pass

    def copier(change):
        class Changing(Copier):
            def __init__(self, device):
                self.n = 0

            def copy(self, images, labels):
                images, labels = images.clone(), labels.clone()
                self.n += 1
                if self.n == 3:
                    change(images, labels)
                return images, labels, Done()

            def wait(self, event, *tensors):
                pass
        return Changing

    def pixel(images, labels):
        images[1, 2, 3, 4] ^= 1

    def label(images, labels):
        labels[5] += 1

    root = coded_split[0]
    reference = race.host_checksums(root, batch=8, crop=16, seed=3, epochs=2)
    cpu = torch.device("cpu")
    common = dict(batch=8, crop=16, seed=3, workers=2)
    assert race.run(root, cpu, reference, copier=copier(lambda i, y: None), **common)[:2] == (0, 2 * len(reference[0]))
    assert race.run(root, cpu, reference, copier=copier(pixel), **common)[0] == 1
    assert race.run(root, cpu, reference, copier=copier(label), **common)[0] == 1


def test_a_timed_out_check_is_killed_with_every_process_it_started(tmp_path):
    """torchrun starts its workers in sessions of their own: killing the check's session is not enough."""
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
              "print(child.pid, flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(proc.stdout.readline())
    runner.kill_tree(proc.pid)
    proc.wait(timeout=10)
    from bench.gpu_check import procs
    assert not procs.wait_gone({grandchild}, timeout=5), "the grandchild in its own session outlived the kill"


def test_what_the_budget_cannot_reach_is_skipped_and_said(tmp_path):
    proc, report, _ = run_check(tmp_path, "--budget", "9", "--only", "versions,data,race,model", timeout=120)
    by_name = {c["name"]: c for c in report["checks"]}
    assert list(by_name) == ["setup", "versions", "data", "race", "model"]
    assert by_name["data"]["status"] == "skipped" and "budget" in by_name["data"]["why"]
    assert by_name["race"]["status"] == "skipped" and "needs data" in by_name["race"]["why"]
    assert by_name["model"]["status"] == "skipped"
    assert "skipped" in report["result"] and proc.returncode == 0


def test_a_check_past_its_limit_is_killed_and_failed(tmp_path):
    """The data check cannot finish in 1 s (it imports torch and draws images): killed, failed, its log kept."""
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    args = runner.parse(["--out", str(out), "--work", str(tmp_path / "work"), "--small"])
    args.out, args.work = str(out), str(tmp_path / "work")
    env = {**os.environ, "PYTHONPATH": ROOT}
    step = next(s for s in runner.STEPS if s.name == "data")
    t0 = time.monotonic()
    result = runner.run_step(step, args, env, timeout=1)
    assert time.monotonic() - t0 < 10
    assert result["status"] == "failed" and "timed out after 1 s" in result["why"]
    assert (out / result["log"]).exists()


def fake_wheel(folder, name, tag="py3-none-any"):
    """A minimal wheel of a module ``name`` that says where it came from."""
    path = folder / f"{name}-9.9-{tag}.whl"
    dist = f"{name}-9.9.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "FROM_WHEEL = True\n")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9\n")
        z.writestr(f"{dist}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{dist}/RECORD", f"{name}/__init__.py,,\n{dist}/METADATA,,\n{dist}/WHEEL,,\n{dist}/RECORD,,\n")
    return path


def blocked(tmp_path, name):
    """An environment in which importing ``name`` fails, as on a machine that lacks it."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / f"{name}.py").write_text(f"raise ImportError('no {name} here')\n")
    return {**os.environ, "PYTHONPATH": str(blocker)}


def test_a_missing_module_is_installed_from_the_wheels_brought_along(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "lmdb")
    fake_wheel(wheels, "lmdb", "cp27-cp27m-manylinux1_x86_64")  # another Python's: never picked
    env = blocked(tmp_path, "lmdb")
    result = runner.setup(str(wheels), str(tmp_path / "pydeps"), env)
    assert result["status"] == "passed", result
    assert result["figures"]["installed"] == ["lmdb-9.9-py3-none-any.whl"]
    assert "missing at start: lmdb" in result["report"]
    probe = subprocess.run([sys.executable, "-c", "import lmdb; print(lmdb.FROM_WHEEL)"], env=env,
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "True"  # the children's PYTHONPATH now finds it first


def test_without_pip_the_wheels_are_unpacked(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path, "lmdb")
    real_run = subprocess.run

    def no_pip(cmd, *a, **kw):
        if cmd[1:3] == ["-m", "pip"]:
            return subprocess.CompletedProcess(cmd, 1, "", "No module named pip")
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(runner.subprocess, "run", no_pip)
    how = runner.install([str(wheel)], str(tmp_path / "target"))
    assert how.startswith("unpacked") and "No module named pip" in how
    assert (tmp_path / "target" / "lmdb" / "__init__.py").read_text() == "FROM_WHEEL = True\n"


def test_a_module_with_no_wheel_is_named_and_only_the_versions_run(tmp_path):
    env = blocked(tmp_path, "lmdb")
    proc, report, out = run_check(tmp_path, "--budget", "60", "--wheels", str(tmp_path / "none"), env=env,
                                  timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    setup = report["checks"][0]
    assert setup["status"] == "failed" and setup["figures"]["missing"] == ["lmdb"]
    assert "make gpu-wheels" in setup["report"]
    versions, *rest = report["checks"][1:]
    assert versions["status"] == "passed" and versions["figures"]["lmdb"].startswith("missing (ImportError")
    assert all(c["status"] == "skipped" and "needs setup" in c["why"] for c in rest)


def test_nothing_but_the_loader_copies_loader_output_to_a_device():
    """The loader owns the hand-off: no other module calls .to(..., non_blocking=True) on its batches (the race
    check's negative control, which breaks the hand-off on purpose, aside)."""
    allowed = {os.path.join("datasets", "device.py"), os.path.join("bench", "gpu_check", "race.py")}
    offenders = []
    for top in ("alexnet", "datasets", "preprocess", "bench", "train.py", "evaluate.py"):
        path = os.path.join(ROOT, top)
        files = [path] if path.endswith(".py") else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                                                     if f.endswith(".py")]
        for f in files:
            rel = os.path.relpath(f, ROOT)
            if rel not in allowed and "non_blocking" in open(f, encoding="utf-8").read():
                offenders.append(rel)
    assert not offenders
