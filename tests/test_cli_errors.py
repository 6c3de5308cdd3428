"""Every command on input it cannot use: one line on stderr naming the path or key and what to do, no traceback,
exit 2; and the damaged splits behind those lines, refused by the reader itself on both loader backends."""
import gzip
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile

import h5py
import lmdb
import numpy as np
import pytest

from datasets import LMDBDataset, format as fmt, make_loader
from preprocess.build_lmdb import build
from tests.conftest import ROOT, encode

N, SIZE, CLASSES = 40, 16, 4


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    with h5py.File(d / "s.h5", "w") as f:
        f["images"] = np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
        f["labels"] = np.arange(N) % CLASSES
    build(str(d / "s.h5"), str(d / "split"), size=SIZE, encoding="raw", shards=2, quiet=True, workers=1)
    return d / "split"


def damaged(split, tmp_path, how):
    root = tmp_path / "damaged"
    shutil.copytree(split, root)
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text())
    if how == "truncated":
        data = root / "shard-00001" / "data.mdb"
        data.write_bytes(data.read_bytes()[:3 * 4096])
    elif how == "page":
        data = root / "shard-00000" / "data.mdb"
        b = bytearray(data.read_bytes())
        b[2 * 4096:3 * 4096] = b"\xab" * 4096
        data.write_bytes(bytes(b))
    elif how == "label":
        env = lmdb.open(str(root / "shard-00000"), map_size=1 << 24)
        with env.begin(write=True) as txn:
            key, value = next(iter(txn.cursor()))
            import msgpack
            rec = msgpack.unpackb(value)
            rec["label"] = CLASSES + 3
            txn.put(key, msgpack.packb(rec))
        env.close()
        return root, int.from_bytes(key, "big")
    elif how == "escape":
        meta["shards"][1]["path"] = "../../elsewhere"
    elif how == "absolute":
        meta["shards"][1]["path"] = "/etc"
    elif how == "size":
        meta["size"] = 64
    elif how == "size_type":
        meta["size"] = "big"
    elif how == "eigvec":
        meta["pca_eigvec"] = [[1, 0], [0, 1]]
    elif how == "eigval":
        meta["pca_eigval"] = ["x", 1, 2]
    meta_path.write_text(json.dumps(meta))
    return root, None


def run(*args, limit_files=None):
    def preexec():
        if limit_files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_files, limit_files))
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec)


def assert_one_line(proc, *names):
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for name in names:
        assert str(name) in err, (name, err)


def write_tar(path, name="x.JPEG"):
    """A tar of one image at its top level: no class folder, and no --labels."""
    with tarfile.open(path, "w") as t:
        data = encode(np.zeros((8, 8, 3), np.uint8))
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


CASES = {
    "binary SRC": (lambda tmp, split: (tmp / "blob.bin").write_bytes(os.urandom(4096)) and
                   ["-m", "preprocess.build_lmdb", tmp / "blob.bin", tmp / "out"], ["blob.bin", "not a text list"]),
    "JPEG as SRC": (lambda tmp, split: (tmp / "a.jpg").write_bytes(encode(np.zeros((8, 8, 3), np.uint8))) and
                    ["-m", "preprocess.build_lmdb", tmp / "a.jpg", tmp / "out"], ["a.jpg", "a JPEG image"]),
    "flat tar without --labels": (lambda tmp, split: write_tar(tmp / "t.tar") or
                                  ["-m", "preprocess.build_lmdb", tmp / "t.tar", tmp / "out"],
                                  ["t.tar", "no class folder", "--labels"]),
    "merge of one part": (lambda tmp, split: ["-m", "preprocess.merge", tmp / "m", split],
                          ["a whole split, not a part"]),
    "truncated HDF5": (lambda tmp, split: (tmp / "t.h5").write_bytes((split.parent / "s.h5").read_bytes()[:3000]) and
                       ["-m", "preprocess.build_lmdb", tmp / "t.h5", tmp / "out", "--format", "hdf5"],
                       ["t.h5", "cannot be read as HDF5"]),
    "HDF5 images of size zero": (lambda tmp, split: _h5(tmp / "z.h5", (3, 0, 0, 3)) or
                                 ["-m", "preprocess.build_lmdb", tmp / "z.h5", tmp / "out"], ["z.h5", "size zero"]),
    "OUT is a file": (lambda tmp, split: (tmp / "f").write_text("x") and
                      ["-m", "preprocess.build_lmdb", split.parent / "s.h5", tmp / "f"], ["f", "not a folder"]),
    "verify: corrupt LMDB page": (lambda tmp, split: ["-m", "preprocess.verify", damaged(split, tmp, "page")[0], "--quiet"],
                                  ["shard-00000", "damaged"]),
    "verify: truncated data.mdb": (lambda tmp, split: ["-m", "preprocess.verify", damaged(split, tmp, "truncated")[0], "--quiet"],
                                   ["shard-00001/data.mdb", "truncated", "12288 bytes"]),
    "verify: meta.json size not a number": (lambda tmp, split: ["-m", "preprocess.verify",
                                                                damaged(split, tmp, "size_type")[0]], ["field size"]),
    "verify: malformed pca_eigvec": (lambda tmp, split: ["-m", "preprocess.verify", damaged(split, tmp, "eigvec")[0]],
                                     ["field pca_eigvec"]),
    "verify: malformed pca_eigval": (lambda tmp, split: ["-m", "preprocess.verify", damaged(split, tmp, "eigval")[0]],
                                     ["field pca_eigval"]),
    "preview: wrong size in meta.json": (lambda tmp, split: ["-m", "datasets.preview", damaged(split, tmp, "size")[0],
                                                             "--out", tmp / "p.png", "--crop", 8],
                                         ["meta.json says size 64"]),
    "preview: --columns 0": (lambda tmp, split: ["-m", "datasets.preview", split, "--out", tmp / "p.png",
                                                 "--columns", 0], ["--columns 0"]),
    "preview: crop above the split's size": (lambda tmp, split: ["-m", "datasets.preview", split, "--out",
                                                                 tmp / "p.png", "--crop", 99], ["crop 99"]),
    "plot: a missing run": (lambda tmp, split: ["-m", "alexnet.plot", tmp / "norun"], ["norun", "train.py"]),
    "evaluate: --ensemble-from a missing file": (
        lambda tmp, split: ["evaluate.py", "--ensemble-from", tmp / "none.h5"], ["none.h5"]),
    "too many open files": (lambda tmp, split: _many_shards(tmp, split) and
                            ["-m", "datasets.preview", tmp / "many", "--out", tmp / "p.png", "--crop", 8,
                             "--count", N], ["too many open files", "ulimit"]),
}


def _h5(path, shape):
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros(shape, np.uint8)
        f["labels"] = np.zeros(shape[0], np.int64)


def _many_shards(tmp, split):
    build(str(split.parent / "s.h5"), str(tmp / "many"), size=SIZE, encoding="raw", shards=N, quiet=True, workers=1)
    return True


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_input_is_one_line_and_exit_2(case, split, tmp_path):
    setup, names = CASES[case]
    args = setup(tmp_path, split)
    proc = run(*args, limit_files=40 if case == "too many open files" else None)
    assert_one_line(proc, *names)


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_a_truncated_shard_is_an_error_not_a_signal(split, tmp_path, backend):
    root, _ = damaged(split, tmp_path, "truncated")
    with pytest.raises(fmt.FormatError, match=r"shard-00001/data.mdb: 12288 bytes, but its LMDB pages need"):
        list(make_loader(root, batch_size=8, train=False, workers=2, backend=backend, crop=8))


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_a_record_with_a_label_beyond_the_classes_is_named(split, tmp_path, backend):
    root, index = damaged(split, tmp_path, "label")
    with pytest.raises(fmt.FormatError, match=rf"record {index} .*label {CLASSES + 3} out of range for the split's "
                                              rf"{CLASSES} classes"):
        list(make_loader(root, batch_size=8, train=False, workers=2, backend=backend, crop=8))
    with pytest.raises(fmt.FormatError, match="out of range"):
        LMDBDataset(root)[index]


@pytest.mark.parametrize("how", ["escape", "absolute"])
def test_a_shard_path_that_leaves_the_split_is_refused(split, tmp_path, how):
    root, _ = damaged(split, tmp_path, how)
    with pytest.raises(fmt.FormatError, match=r"field shards\[1\]\.path .*relative and stay inside the split"):
        LMDBDataset(root)


def test_make_loader_arguments_are_checked(split):
    for kwargs, message in (({"workers": -1}, "workers=-1: must be an integer >= 0"),
                            ({"workers": 0, "batch_size": 0}, "batch_size=0"),
                            ({"workers": 2, "prefetch": 0}, "prefetch=0"),
                            ({"workers": 0, "crop": SIZE + 1}, f"crop {SIZE + 1} must be in 1..{SIZE}")):
        with pytest.raises(ValueError, match=message):
            make_loader(split, **{"batch_size": 4, "train": True, "crop": 8, **kwargs})


def test_plot_leaves_out_a_torn_last_line_and_train_log_repairs_it(tmp_path):
    from alexnet.plot import plot
    from alexnet.run import RunLog, read_log
    row = {"epoch": 0, "step": 1, "lr": 0.01, "train_loss": 2.0, "train_top1": 0.1, "val_loss": 2.1, "val_top1": 0.1,
           "val_top5": 0.5}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "epoch": 1})[:30])
    assert [r["epoch"] for r in read_log(tmp_path)] == [0]
    assert os.path.exists(plot(tmp_path))
    RunLog(tmp_path).write({**row, "epoch": 1})
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 1]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n{torn\n" + json.dumps(row) + "\n")
    proc = run("-m", "alexnet.plot", tmp_path)
    assert_one_line(proc, "metrics.jsonl:2")


def test_gzip_of_a_list_is_named_too(tmp_path):
    (tmp_path / "l.txt.gz").write_bytes(gzip.compress(b"a.jpg 0\n"))
    proc = run("-m", "preprocess.build_lmdb", tmp_path / "l.txt.gz", tmp_path / "out")
    assert_one_line(proc, "l.txt.gz", "unpack it")
