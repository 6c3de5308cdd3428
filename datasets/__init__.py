"""Packed LMDB splits: the on-disk format (``datasets.format``), random access (``LMDBDataset``), the
batch loader (``make_loader``) and the on-device transforms (``Normalize``, ``ten_crop``).

Names are imported on first use, so the offline builder (which needs only ``datasets.format``) starts
without importing torch. This package shadows the PyPI package ``datasets`` when run from the repository
root; the project depends on neither it nor ``evaluate``. Installed (``pip install .``), it is the top-level
package ``datasets``, as Hugging Face's is: the two cannot share an environment (pip lets the later install
overwrite the other's files), so importing this one warns when Hugging Face's is installed too.
"""
import importlib
import importlib.metadata
import os
import warnings

_EXPORTS = {
    "LMDBDataset": "datasets.lmdb_dataset",
    "make_loader": "datasets.loader",
    "Loader": "datasets.loader",
    "Normalize": "datasets.transforms",
    "ten_crop": "datasets.transforms",
    "pca_lighting": "datasets.transforms",
}
__all__ = list(_EXPORTS)


def _check_namesake():
    """Warn when this package is installed and a distribution called ``datasets`` (Hugging Face's) claims the
    same name."""
    where = os.path.dirname(os.path.abspath(__file__))
    if os.path.basename(os.path.dirname(where)) not in ("site-packages", "dist-packages"):
        return  # run from the repository: this folder shadows the other only in this process
    try:
        other = importlib.metadata.distribution("datasets")
    except importlib.metadata.PackageNotFoundError:
        return
    warnings.warn(f"Hugging Face's datasets {other.version} is installed in this environment, and this project's "
                  f"package 'datasets' ({where}) has the same name: one of them is broken here. Install "
                  "alexnet-lmdb in its own virtual environment.", RuntimeWarning, stacklevel=2)


_check_namesake()


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datasets' has no attribute {name!r}")
