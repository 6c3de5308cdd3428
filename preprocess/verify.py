"""Check a packed split end to end: ``python -m preprocess.verify OUT``.

Re-reads every record: its key is the next index, its crc32 holds, it decodes to the declared shape,
its label indexes ``classes``; the counts agree with meta.json; the pixel statistics recomputed from the
records match meta.json (exactly for lossless encodings; within JPEG's small shift otherwise).
Exits non-zero naming the first bad record.
"""
import argparse
import multiprocessing
import os
import signal
import sys

import cv2
import lmdb
import numpy as np
from tqdm import tqdm

from datasets import cli, format as fmt
from preprocess.stats import PixelStats

# The statistics are of the pixels before encoding. JPEG keeps a channel mean within a fraction of a
# level, but its 4:2:0 chroma subsampling removes fine colour detail: the RGB covariance of photographs
# moves by a few percent, that of pixel-scale colour noise by up to ~15%. A wrong split, scale (0–1 vs
# 0–255) or channel order is far outside these bounds.
JPEG_MEAN_TOL = 1.0
JPEG_COV_REL_TOL = 0.25


class VerifyError(Exception):
    pass


def _compare_stats(meta, stats, lossless, where):
    """Raise if meta.json's statistics are not those of the records; else (max mean diff, covariance rel diff)."""
    if lossless:
        recorded = meta.get("stats")
        if recorded is not None and (recorded["sum"] != stats.sum.tolist()
                                     or recorded["sum_products"] != stats.gram.tolist()
                                     or recorded["pixels"] != stats.count):
            raise VerifyError(f"{where}: pixel sums of the records differ from meta.json's 'stats'")
    got = stats.summary()
    mean_tol = 1e-6 if lossless else JPEG_MEAN_TOL
    diff = np.abs(np.array(got["mean_rgb"]) - np.array(meta["mean_rgb"])).max()
    if diff > mean_tol:
        raise VerifyError(f"{where}: mean_rgb {meta['mean_rgb']} in meta.json, {got['mean_rgb']} in the records")

    def cov(s):
        v = np.array(s["pca_eigvec"])
        return v @ np.diag(s["pca_eigval"]) @ v.T

    rel = np.linalg.norm(cov(got) - cov(meta)) / max(np.linalg.norm(cov(meta)), 1e-12)
    if rel > (1e-6 if lossless else JPEG_COV_REL_TOL):
        raise VerifyError(f"{where}: the PCA of meta.json (pca_eigval {meta['pca_eigval']}) differs from the "
                          f"records' ({got['pca_eigval']}) by {rel:.1%} of the covariance")
    return diff, rel


def _records(txn, path, start):
    """The shard's (key, value) pairs; a damaged LMDB page becomes an error naming the shard and record."""
    cursor, index = txn.cursor(), start
    try:
        more = cursor.first()
        while more:
            yield cursor.key(), cursor.value()
            index += 1
            more = cursor.next()
    except lmdb.Error as exc:
        raise VerifyError(f"{path}: LMDB reports '{exc}' reading record {index}: the shard is damaged; restore "
                          "it from a copy or rebuild the split") from None


def verify(root, *, quiet=False, on_shard=None):
    """Raises VerifyError (or FormatError) at the first problem; returns the records checked and how far
    the recomputed statistics are from meta.json's."""
    meta = fmt.read_meta(root)
    enc, size, n_classes = meta["encoding"], meta["size"], len(meta["classes"])
    lossless = enc != "jpeg"
    image_shape = (size, size, 3)
    mean_image = fmt.read_mean_image(root, meta)
    stats = PixelStats(image_shape if mean_image is not None else None)
    total = meta["num_records"]  # read_meta checked that the shards add up to it
    index = 0
    with tqdm(total=total, unit="rec", disable=quiet, file=sys.stderr) as bar:
        for shard, first_key in zip(meta["shards"], fmt.first_keys(meta)):
            path = os.path.join(root, shard["path"])
            if on_shard is not None:
                on_shard(path)
            env = fmt.open_shard(path, readahead=True)
            sum_before = index
            try:
                entries = env.stat()["entries"]
                if entries != shard["num_records"]:
                    raise VerifyError(f"{path}: {entries} records, meta.json says {shard['num_records']}")
                with env.begin() as txn:
                    for key, value in _records(txn, path, index):
                        where = f"{shard['path']} record {index}"
                        expected = first_key + index - sum_before
                        if len(key) != 8 or fmt.decode_key(key) != expected:
                            raise VerifyError(f"{where}: key is {bytes(key)[:16].hex()}, expected {expected} as 8 "
                                              "big-endian bytes; the shard is damaged")
                        rec = fmt.unpack_record(value, where=where)
                        if tuple(rec["shape"]) != image_shape:
                            raise VerifyError(f"{where} (source {rec['source']!r}): shape {rec['shape']}, "
                                              f"the split's size is {size}")
                        if not 0 <= rec["label"] < n_classes:
                            raise VerifyError(f"{where} (source {rec['source']!r}): label {rec['label']} "
                                              f"out of range for {n_classes} classes")
                        stats.add(cv2.cvtColor(fmt.decode_image(rec, enc, where=where), cv2.COLOR_RGB2BGR))
                        index += 1
                        bar.update()
            finally:
                env.close()
    mean_diff, cov_diff = _compare_stats(meta, stats, lossless, f"{root}/meta.json")
    if mean_image is not None:
        diff = np.abs(stats.mean_image() - mean_image)
        diff = diff.max() if lossless else diff.mean()  # JPEG's per-pixel error averages out only over many images
        if diff > (1e-3 if lossless else 2 * JPEG_MEAN_TOL):
            raise VerifyError(f"{root}/{meta['mean_image']}: differs from the records' mean image by {diff:.2f} "
                              f"({'largest' if lossless else 'mean absolute'} difference)")
    return {"records": index, "mean_diff": mean_diff, "cov_rel_diff": cov_diff}


def _in_child(root, quiet):
    """``verify`` in a forked process: a shard damaged so that LMDB reads past its file kills the reader with
    SIGBUS, which a process cannot catch in itself; here it becomes an error naming the shard."""
    reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)

    def run():
        reader.close()
        try:
            writer.send(("done", verify(root, quiet=quiet, on_shard=lambda p: writer.send(("shard", p)))))
        except (VerifyError, fmt.FormatError) as exc:
            writer.send(("error", str(exc)))

    child = multiprocessing.get_context("fork").Process(target=run)
    child.start()
    writer.close()
    shard, outcome = root, None
    while outcome is None:
        try:
            kind, value = reader.recv()
        except EOFError:
            break
        if kind == "shard":
            shard = value
        else:
            outcome = (kind, value)
    child.join()
    if outcome is None:
        how = f"signal {signal.Signals(-child.exitcode).name}" if child.exitcode < 0 else f"exit {child.exitcode}"
        raise VerifyError(f"{shard}: reading it crashed the reader ({how}): the shard's file is damaged; restore it "
                          "from a copy or rebuild the split")
    if outcome[0] == "error":
        raise VerifyError(outcome[1])
    return outcome[1]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m preprocess.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="a split directory written by preprocess.build_lmdb")
    p.add_argument("--quiet", action="store_true", help="no progress bar; print only problems")
    args = p.parse_args(argv)
    try:
        result = _in_child(args.root, args.quiet)
    except (VerifyError, fmt.FormatError) as exc:
        print(f"FAILED: {' '.join(str(exc).split())}", file=sys.stderr)
        return cli.EXPLAINED_EXIT
    if not args.quiet:
        print(f"{args.root}: OK, {result['records']} records; statistics recomputed from them differ from "
              f"meta.json by {result['mean_diff']:.3g} (mean, 0-255) and {result['cov_rel_diff']:.2%} (covariance)")
    return 0


if __name__ == "__main__":
    cli.run(main)
