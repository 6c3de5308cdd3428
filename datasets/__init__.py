"""Packed LMDB splits: the on-disk format (``datasets.format``) and, in time, the loader that streams them.

This package shadows the PyPI package ``datasets`` when run from the repository root; the project
depends on neither it nor ``evaluate``.
"""
