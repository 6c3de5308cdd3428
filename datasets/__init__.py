"""Packed LMDB splits: the on-disk format (``datasets.format``), random access (``LMDBDataset``), the
batch loader (``make_loader``) and the on-device transforms (``Normalize``, ``ten_crop``).

Names are imported on first use, so the offline builder (which needs only ``datasets.format``) starts
without importing torch. This package shadows the PyPI package ``datasets`` when run from the repository
root; the project depends on neither it nor ``evaluate``.
"""
import importlib

_EXPORTS = {
    "LMDBDataset": "datasets.lmdb_dataset",
    "make_loader": "datasets.loader",
    "Loader": "datasets.loader",
    "Normalize": "datasets.transforms",
    "ten_crop": "datasets.transforms",
    "pca_lighting": "datasets.transforms",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datasets' has no attribute {name!r}")
