"""The builder end to end, read back with plain lmdb + msgpack + json (not through the project's reader)."""
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import cv2
import h5py
import lmdb
import msgpack
import numpy as np
import pytest

from preprocess.build_lmdb import BuildError, build
from tests.conftest import ROOT, encode, random_rgb, run_cli, write_image_folder
from tests.preprocess.test_sources import write_cifar10


def read_plain(root):
    """(meta, [records]) read with nothing but json, lmdb and msgpack, checking keys (docs/FORMAT.md) and crc32 on
    the way."""
    with open(os.path.join(root, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    records, index = [], 0
    for shard in meta["shards"]:
        env = lmdb.open(os.path.join(root, shard["path"]), readonly=True, lock=False)
        key_offset = shard["first_key"] - index if meta["version"] >= 2 else 0  # version 1: keys are indices
        with env.begin() as txn:
            assert txn.stat()["entries"] == shard["num_records"]
            for key, value in txn.cursor():
                assert key == (index + key_offset).to_bytes(8, "big")
                rec = msgpack.unpackb(value)
                assert zlib.crc32(rec["image"]) == rec["crc32"]
                records.append(rec)
                index += 1
        env.close()
    assert index == meta["num_records"]
    return meta, records


def pixels(rec, encoding):
    if encoding == "raw":
        return np.frombuffer(rec["image"], np.uint8).reshape(rec["shape"])
    return cv2.imdecode(np.frombuffer(rec["image"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]


def upsample2(a, axis):
    """Bilinear 2× enlargement along ``axis``: output 2i and 2i+1 sit at source i ∓ 1/4 (edges clamped)."""
    a = np.moveaxis(a, axis, 0)
    prev, nxt = np.concatenate([a[:1], a[:-1]]), np.concatenate([a[1:], a[-1:]])
    out = np.empty((2 * len(a),) + a.shape[1:])
    out[0::2], out[1::2] = 0.75 * a + 0.25 * prev, 0.75 * a + 0.25 * nxt
    return np.moveaxis(out, 0, axis)


@pytest.fixture
def folder(tmp_path, rng):
    src = tmp_path / "src"
    return src, write_image_folder(str(src), ["bird", "cat", "dog"], 5, rng, size=(90, 70))


def test_image_folder_build_reads_back_plainly(folder, tmp_path):
    src, written = folder
    out = tmp_path / "out"
    run_cli("preprocess.build_lmdb", src, out, "--size", 32, "--encoding", "raw", "--workers", 2, "--quiet")
    meta, records = read_plain(out)
    assert meta["format"] == "alexnet-lmdb" and meta["version"] == 2
    assert meta["classes"] == ["bird", "cat", "dog"] and meta["num_records"] == 15
    assert meta["size"] == 32 and meta["encoding"] == "raw" and meta["skipped"] == []
    assert [s["path"] for s in meta["shards"]] == ["shard-00000"]
    assert sorted(r["source"] for r in records) == sorted(written)
    order = [r["source"] for r in records]
    assert order != sorted(order), "records are shuffled so a sequential read mixes classes"
    for r in records:
        assert r["label"] == meta["classes"].index(r["source"].split("/")[0])
        assert r["shape"] == [32, 32, 3]
    # Pixels against an independent computation: Pillow decode, cv2 area resize of the shorter side, crop.
    rgb = cv2.imdecode(np.frombuffer(encode(written[order[0]]), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    expected = cv2.resize(np.ascontiguousarray(rgb), (41, 32), interpolation=cv2.INTER_AREA)[:, 4:36]
    assert np.abs(pixels(records[0], "raw").astype(int) - expected).mean() < 2.0
    # Statistics against numpy over the decoded records (raw: exactly the pixels the stats saw).
    px = np.concatenate([pixels(r, "raw").reshape(-1, 3) for r in records]).astype(np.float64)
    np.testing.assert_allclose(meta["mean_rgb"], px.mean(0), rtol=1e-12)
    np.testing.assert_allclose(meta["std_rgb"], px.std(0), rtol=1e-9)
    vec, val = np.array(meta["pca_eigvec"]), np.array(meta["pca_eigval"])
    np.testing.assert_allclose(vec @ np.diag(val) @ vec.T, np.cov(px / 255, rowvar=False, bias=True), atol=1e-12)
    assert list(val) == sorted(val, reverse=True)


def test_seed_and_order(folder, tmp_path):
    src, _ = folder
    orders = {}
    for name, extra in [("a", []), ("b", []), ("c", ["--seed", "7"]), ("d", ["--no-shuffle"])]:
        build(str(src), str(tmp_path / name), size=16, workers=1, quiet=True,
              **{"seed": 7} if extra == ["--seed", "7"] else {"shuffle": extra != ["--no-shuffle"]})
        orders[name] = [r["source"] for r in read_plain(tmp_path / name)[1]]
    assert orders["a"] == orders["b"] != orders["c"]
    assert orders["d"] == sorted(orders["d"], key=lambda s: (s.split("/")[0], s))


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
def test_encoded_stats_match_decoded_records(folder, tmp_path, encoding):
    src, _ = folder
    build(str(src), str(tmp_path / "o"), size=48, encoding=encoding, workers=1, quiet=True)
    meta, records = read_plain(tmp_path / "o")
    assert meta["quality"] == (90 if encoding == "jpeg" else None)
    px = np.concatenate([pixels(r, encoding).reshape(-1, 3) for r in records]).astype(np.float64)
    tol = 1.0 if encoding == "jpeg" else 1e-9  # stats are of the pixels before encoding
    assert np.abs(np.array(meta["mean_rgb"]) - px.mean(0)).max() <= tol


def test_shards_mean_image_and_worker_counts_agree(folder, tmp_path):
    src, _ = folder
    build(str(src), str(tmp_path / "w1"), size=24, encoding="raw", shards=3, workers=1, mean_image=True, quiet=True)
    build(str(src), str(tmp_path / "w2"), size=24, encoding="raw", shards=3, workers=2, mean_image=True, quiet=True)
    m1, r1 = read_plain(tmp_path / "w1")
    m2, r2 = read_plain(tmp_path / "w2")
    assert [s["num_records"] for s in m1["shards"]] == [5, 5, 5]
    assert r1 == r2 and m1["mean_rgb"] == m2["mean_rgb"] and m1["stats"] == m2["stats"]
    mean_image = np.load(tmp_path / "w1" / m1["mean_image"], allow_pickle=False)
    stack = np.stack([pixels(r, "raw") for r in r1]).astype(np.float64)
    np.testing.assert_allclose(mean_image, stack.mean(0), atol=1e-4)
    for shard in m1["shards"]:  # per-shard sums add up to the total, so shards combine exactly
        assert shard["stats"]["pixels"] == 5 * 24 * 24
    assert np.sum([s["stats"]["sum"] for s in m1["shards"]], axis=0).tolist() == m1["stats"]["sum"]


def test_map_grows_instead_of_map_full(folder, tmp_path):
    src, _ = folder
    build(str(src), str(tmp_path / "o"), size=64, encoding="raw", workers=1, quiet=True, map_size=64 << 10)
    assert read_plain(tmp_path / "o")[0]["num_records"] == 15


def test_odd_and_bad_inputs(tmp_path, rng):
    src = tmp_path / "src" / "only"
    src.mkdir(parents=True)
    ok = {
        "png named.JPEG": encode(random_rgb(rng, 20, 30), "PNG"),
        "tiny.jpg": encode(random_rgb(rng, 9, 12)),
        "long strip.jpg": encode(random_rgb(rng, 60, 2400)),
        "grey.jpg": encode(random_rgb(rng, 30, 30)[..., 0]),
        "ñame.png": encode(np.dstack([random_rgb(rng, 30, 30), np.full((30, 30), 9, np.uint8)]), "PNG"),
    }
    full = encode(random_rgb(rng, 60, 80))
    bad = {"empty.jpg": b"", "text.jpg": b"hello", "cut.jpg": full[: len(full) // 2],
           "huge.jpg": encode(random_rgb(rng, 400, 500))}
    for name, data in {**ok, **bad}.items():
        (src / name).write_bytes(data)
    out = tmp_path / "out"
    proc = run_cli("preprocess.build_lmdb", tmp_path / "src", out, "--size", 16, "--max-pixels", 150_000,
                   "--workers", 1)
    meta, records = read_plain(out)
    assert sorted(r["source"] for r in records) == sorted(f"only/{n}" for n in ok)
    reasons = {s["source"]: s["reason"] for s in meta["skipped"]}
    assert reasons["only/empty.jpg"].startswith("empty file")
    assert reasons["only/text.jpg"].startswith("not an image")
    assert reasons["only/cut.jpg"].startswith("truncated JPEG")
    assert reasons["only/huge.jpg"].startswith("too many pixels")
    assert "skipped 4" in proc.stdout and "truncated JPEG" in proc.stdout
    strict = run_cli("preprocess.build_lmdb", tmp_path / "src", tmp_path / "strict", "--size", 16,
                     "--strict", "--workers", 1, check=False)
    assert strict.returncode != 0 and "only/" in strict.stderr and "--strict" in strict.stderr
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("case", ["missing", "empty class", "bad line", "label range", "h5 shape"])
def test_bad_sources_exit_nonzero_naming_the_culprit(case, tmp_path, rng):
    if case == "missing":
        src, expect = tmp_path / "nowhere", "nowhere: no such file"
    elif case == "empty class":
        write_image_folder(str(tmp_path / "s"), ["a"], 1, rng)
        (tmp_path / "s" / "b").mkdir()
        src, expect = tmp_path / "s", "b: class folder holds no image files"
    elif case in ("bad line", "label range"):
        src = tmp_path / "list.txt"
        src.write_text("x.jpg 0\ny.jpg one\n" if case == "bad line" else "x.jpg 0\ny.jpg -3\n")
        expect = "list.txt:2:"
    else:
        src = tmp_path / "d.h5"
        with h5py.File(src, "w") as f:
            f["images"] = np.zeros((2, 8, 8), np.uint8)
            f["labels"] = np.zeros(2, np.int64)
        expect = "dataset 'images' is uint8 [2, 8, 8]"
    proc = run_cli("preprocess.build_lmdb", src, tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert expect in proc.stderr
    assert not (tmp_path / "out").exists()


def test_list_hdf5_and_cifar_sources(tmp_path, rng):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k in range(4):
        (imgs / f"{k}.jpg").write_bytes(encode(random_rgb(rng, 40, 50)))
    (tmp_path / "l.txt").write_text("".join(f"{k}.jpg {k % 2}\n" for k in range(4)))
    build(str(tmp_path / "l.txt"), str(tmp_path / "from_list"), root=str(imgs), size=16, workers=1, quiet=True)
    meta, recs = read_plain(tmp_path / "from_list")
    assert meta["classes"] == ["0", "1"] and sorted((r["source"], r["label"]) for r in recs) == \
        [("0.jpg", 0), ("1.jpg", 1), ("2.jpg", 0), ("3.jpg", 1)]

    images = rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("images", data=images, chunks=(2, 16, 16, 3))
        f["labels"] = np.arange(7) % 3
    build(str(tmp_path / "d.h5"), str(tmp_path / "from_h5"), size=16, encoding="raw", workers=2, quiet=True)
    meta, recs = read_plain(tmp_path / "from_h5")
    assert meta["classes"] == ["0", "1", "2"]
    for r in recs:  # source is the input index; same size: pixels unchanged
        assert r["label"] == r["source"] % 3
        assert np.array_equal(pixels(r, "raw"), images[r["source"]])

    cifar_images, cifar_labels = write_cifar10(tmp_path / "cifar", rng, per_batch=2)
    run_cli("preprocess.build_lmdb", tmp_path / "cifar", tmp_path / "c64", "--size", 64, "--encoding", "raw",
            "--quiet")
    meta, recs = read_plain(tmp_path / "c64")
    assert meta["num_records"] == 10 and meta["classes"][0] == "class0"
    for r in recs:  # 32 -> 64 by bilinear upsampling (pixel centres aligned), computed here with numpy
        assert r["label"] == cifar_labels[r["source"]]
        expected = upsample2(upsample2(cifar_images[r["source"]].astype(float), 0), 1)
        assert np.abs(pixels(r, "raw") - expected).max() <= 1.0
    run_cli("preprocess.build_lmdb", tmp_path / "cifar", tmp_path / "c64test", "--size", 64, "--split", "test",
            "--classes-from", tmp_path / "c64", "--quiet")
    assert read_plain(tmp_path / "c64test")[0]["num_records"] == 2


def test_classes_from_gives_train_indices(tmp_path, rng):
    write_image_folder(str(tmp_path / "train"), ["a", "b", "c"], 2, rng)
    write_image_folder(str(tmp_path / "val"), ["c", "a"], 2, rng)
    build(str(tmp_path / "train"), str(tmp_path / "t"), size=16, workers=1, quiet=True)
    build(str(tmp_path / "val"), str(tmp_path / "v"), size=16, workers=1, quiet=True,
          classes_from=str(tmp_path / "t"))
    meta, recs = read_plain(tmp_path / "v")
    assert meta["classes"] == ["a", "b", "c"]
    assert {r["source"].split("/")[0]: r["label"] for r in recs} == {"a": 0, "c": 2}
    write_image_folder(str(tmp_path / "val2"), ["zebra"], 1, rng)
    with pytest.raises(Exception, match="class 'zebra' is not among"):
        build(str(tmp_path / "val2"), str(tmp_path / "v2"), size=16, quiet=True, classes_from=str(tmp_path / "t"))


def test_existing_output_is_never_overwritten_silently(folder, tmp_path):
    src, _ = folder
    out = tmp_path / "o"
    build(str(src), str(out), size=16, workers=1, quiet=True)
    before = (out / "meta.json").read_bytes()
    with pytest.raises(BuildError, match="already exists; pass --overwrite"):
        build(str(src), str(out), size=16, workers=1, quiet=True)
    assert (out / "meta.json").read_bytes() == before
    build(str(src), str(out), size=20, workers=1, quiet=True, overwrite=True)
    assert read_plain(out)[0]["size"] == 20
    assert sorted(os.listdir(tmp_path)) == ["o", "src"]


def _kill_mid_build(cmd, partial, out):
    """Start a build, SIGKILL it once it has committed new progress, return when it is dead."""
    progress = partial / "progress.msgpack"
    before = progress.read_bytes() if progress.exists() else None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not progress.exists() or progress.read_bytes() == before:
        assert proc.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed build must not leave an OUT that looks complete"
    assert partial.exists()


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted(tmp_path, rng):
    write_image_folder(str(tmp_path / "src"), [f"c{k}" for k in range(4)], 60, rng, size=(400, 300))
    args = ["--size", 64, "--shards", 3, "--commit-every", 8, "--mean-image", "--quiet"]
    run_cli("preprocess.build_lmdb", tmp_path / "src", tmp_path / "ref", *args, "--workers", 1)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    cmd = [sys.executable, "-m", "preprocess.build_lmdb", str(tmp_path / "src"), str(out), *map(str, args)]
    _kill_mid_build(cmd + ["--workers", "2"], partial, out)
    again = run_cli("preprocess.build_lmdb", tmp_path / "src", out, *args, check=False)
    assert again.returncode != 0 and "--resume" in again.stderr  # an interrupted build is not clobbered
    _kill_mid_build(cmd + ["--workers", "1", "--resume"], partial, out)  # killed twice
    run_cli("preprocess.build_lmdb", tmp_path / "src", out, *args, "--resume", "--workers", 2)
    ref_meta, ref_records = read_plain(tmp_path / "ref")
    meta, records = read_plain(out)
    assert records == ref_records
    for key in ("mean_rgb", "std_rgb", "pca_eigval", "pca_eigvec", "shards", "stats", "skipped"):
        assert meta[key] == ref_meta[key], key
    assert np.array_equal(np.load(out / "mean_image.npy"), np.load(tmp_path / "ref" / "mean_image.npy"))
    assert not partial.exists()


def test_resume_refuses_changed_options(folder, tmp_path):
    src, _ = folder
    (tmp_path / "o.partial").mkdir()
    (tmp_path / "o.partial" / "plan.json").write_text(json.dumps(
        {"params": {"size": 99}, "digest": "x", "num_items": 15}))
    with pytest.raises(BuildError, match="option 'size' was 99 and is now 16"):
        build(str(src), str(tmp_path / "o"), size=16, quiet=True, resume=True)


def test_workers_start_cleanly_from_a_busy_process(folder, tmp_path):
    """build() as a library, after torch (OpenMP) and OpenCV's thread pool have run: forked workers must not
    inherit the pool (they would hang). Run in a fresh interpreter, under a timeout."""
    src, _ = folder
    script = (
        "import sys, numpy as np, cv2, torch\n"
        "torch.ones(500, 500) @ torch.ones(500, 500)\n"
        "cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (500, 500), interpolation=cv2.INTER_AREA)\n"
        "threads = cv2.getNumThreads()\n"
        "from preprocess.build_lmdb import build\n"
        f"r = build({str(src)!r}, {str(tmp_path / 'o')!r}, size=16, workers=2, quiet=True)\n"
        "assert cv2.getNumThreads() == threads, 'the caller keeps its OpenCV setting'\n"
        "print(r['written'])\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "15"


def _interrupt_after_lmdb_commit(monkeypatch, commits):
    """The builder stops (as if killed) right after its ``commits``-th LMDB commit, before that commit's progress
    write: the narrowest window of a build, too narrow for a timed kill."""
    from preprocess import build_lmdb
    done = {"n": 0}
    original = build_lmdb._Writer.commit

    def commit(self):
        if self.env is not None and self.pending and done["n"] + 1 == commits:
            build_lmdb._put_all(self.env, sum(self.counts), self.pending)
            raise KeyboardInterrupt
        done["n"] += bool(self.env is not None and self.pending)
        return original(self)

    monkeypatch.setattr(build_lmdb._Writer, "commit", commit)


@pytest.mark.parametrize("commits", [1, 2])
def test_a_build_stopped_right_after_an_lmdb_commit_resumes(folder, tmp_path, monkeypatch, commits):
    src, _ = folder
    args = dict(size=16, shards=2, commit_every=2, workers=1, quiet=True)
    build(str(src), str(tmp_path / "ref"), **args)
    with monkeypatch.context() as m:
        _interrupt_after_lmdb_commit(m, commits)
        with pytest.raises(KeyboardInterrupt):
            build(str(src), str(tmp_path / "out"), **args)
    assert (tmp_path / "out.partial" / "shard-00000").exists() and not (tmp_path / "out").exists()
    build(str(src), str(tmp_path / "out"), resume=True, **args)
    assert read_plain(tmp_path / "out")[1] == read_plain(tmp_path / "ref")[1]


@pytest.mark.parametrize("damage", [b"", b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({"position": "x"}),
                                    msgpack.packb({"position": 4, "counts": [2], "skipped": [], "shards": []})])
def test_a_damaged_progress_file_restarts_the_build_and_says_so(folder, tmp_path, monkeypatch, capsys, damage):
    src, _ = folder
    args = dict(size=16, shards=2, commit_every=2, workers=1)
    build(str(src), str(tmp_path / "ref"), quiet=True, **args)
    with monkeypatch.context() as m:
        _interrupt_after_lmdb_commit(m, 2)
        with pytest.raises(KeyboardInterrupt):
            build(str(src), str(tmp_path / "out"), quiet=True, **args)
    (tmp_path / "out.partial" / "progress.msgpack").write_bytes(damage)
    capsys.readouterr()
    build(str(src), str(tmp_path / "out"), resume=True, **args)
    err = capsys.readouterr().err
    assert "progress.msgpack is damaged" in err and "restarts from its first input" in err and "Traceback" not in err
    assert read_plain(tmp_path / "out")[1] == read_plain(tmp_path / "ref")[1]
