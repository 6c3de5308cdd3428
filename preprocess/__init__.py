"""Offline: pack images into LMDB splits (``build_lmdb``), check them (``verify``), merge parts (``merge``).

Importing it (``alexnet`` imports it too) checks that the top-level package ``datasets`` is this project's:
installed, it shares its name with Hugging Face's ``datasets``, and whichever was installed last, or comes
first on the path, hides the other.
"""
import importlib.util
import os


def _check_datasets():
    spec = importlib.util.find_spec("datasets")
    where = os.path.dirname(spec.origin) if spec and spec.origin else None
    if where is None or not os.path.exists(os.path.join(where, "format.py")) \
            or not os.path.exists(os.path.join(where, "worker_pool.py")):
        raise ImportError(f"the package 'datasets' found here ({where}) is not this project's (Hugging Face's has the "
                          "same name): install alexnet-lmdb in its own virtual environment, or run it from its "
                          "checkout")


_check_datasets()
