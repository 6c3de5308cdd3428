"""pip install . in a fresh virtual environment: the project installs and imports from anywhere, and says so when
Hugging Face's datasets claims the same top-level name."""
import os
import shutil
import subprocess
import sys
import venv

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_pip_install_in_a_fresh_venv(tmp_path):
    # system site packages: torch, the other dependencies, pip and setuptools come from this machine, not the
    # network; the project itself is built from the checkout by setuptools, through pyproject.toml
    venv.create(tmp_path / "env", system_site_packages=True, with_pip=False)
    py = str(tmp_path / "env" / "bin" / "python")
    work = tmp_path / "elsewhere"
    work.mkdir()
    clone = tmp_path / "clone"  # the tracked files, as a fresh clone has them: setuptools builds in the tree
    for rel in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split():
        os.makedirs(os.path.dirname(clone / rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), clone / rel)
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", clone], cwd=work,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    check = ("import alexnet, datasets, preprocess, sys; from alexnet import AlexNet; "
             "from datasets import make_loader, LMDBDataset; import alexnet.predict, alexnet.export, preprocess.merge; "
             "print(datasets.__file__)")
    proc = subprocess.run([py, "-W", "error", "-c", check], cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "env") in proc.stdout and ROOT not in proc.stdout
    proc = subprocess.run([py, "-m", "preprocess.build_lmdb", "--help"], cwd=work, capture_output=True, text=True)
    assert proc.returncode == 0 and "--parts" in proc.stdout
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True).stdout.strip()
    info = os.path.join(site, "datasets-2.19.0.dist-info")  # what installing Hugging Face's datasets leaves
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: datasets\nVersion: 2.19.0\n")
    proc = subprocess.run([py, "-c", "import datasets"], cwd=work, capture_output=True, text=True)
    assert "Hugging Face's datasets 2.19.0 is installed" in proc.stderr and "own virtual environment" in proc.stderr
    os.remove(os.path.join(info, "METADATA"))
    os.rmdir(info)
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", clone],
                          cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([py, "-W", "error", "-c", "import datasets; print(datasets.__file__)"], cwd=work,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith(str(clone)), proc.stdout + proc.stderr  # editable
    os.makedirs(os.path.join(site, "datasets"))  # Hugging Face's installed after: it comes first on the path
    open(os.path.join(site, "datasets", "__init__.py"), "w").close()
    proc = subprocess.run([py, "-m", "alexnet.predict", "--help"], cwd=work, capture_output=True, text=True)
    assert proc.returncode != 0 and "is not this project's" in proc.stderr and "own virtual environment" in proc.stderr
