"""preprocess.verify passes a good split and names the first bad record of a damaged one."""
import json
import shutil

import lmdb
import msgpack
import pytest

from preprocess.build_lmdb import build
from tests.conftest import run_cli, write_image_folder


@pytest.fixture
def split(tmp_path, rng):
    write_image_folder(str(tmp_path / "src"), ["a", "b"], 6, rng, size=(80, 60))
    build(str(tmp_path / "src"), str(tmp_path / "out"), size=32, shards=2, workers=1, quiet=True, mean_image=True)
    return tmp_path / "out"


def test_good_split_passes(split):
    proc = run_cli("preprocess.verify", split)
    assert "OK, 12 records" in proc.stdout


def test_flipped_byte_is_caught_and_named(split):
    env = lmdb.open(str(split / "shard-00001"), readonly=True, lock=False)
    with env.begin() as txn:
        key, value = list(txn.cursor())[2]
    env.close()
    index = int.from_bytes(key, "big")
    image = msgpack.unpackb(value)["image"]
    data = (split / "shard-00001" / "data.mdb").read_bytes()
    at = data.index(image) + len(image) // 2
    (split / "shard-00001" / "data.mdb").write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:])
    proc = run_cli("preprocess.verify", split, "--quiet", check=False)
    assert proc.returncode != 0
    assert f"shard-00001 record {index}" in proc.stderr and "crc32" in proc.stderr


@pytest.mark.parametrize("damage,message", [
    ("mean", "mean_rgb"),
    ("count", "num_records 13"),
    ("shard", "shard directory is missing"),
    ("version", "version 3"),
])
def test_damaged_meta_or_shards_fail(split, damage, message):
    meta = json.loads((split / "meta.json").read_text())
    if damage == "mean":
        meta["mean_rgb"][1] += 3
    elif damage == "count":
        meta["num_records"] = 13
    elif damage == "version":
        meta["version"] = 3
    else:
        shutil.rmtree(split / "shard-00000")
    (split / "meta.json").write_text(json.dumps(meta))
    proc = run_cli("preprocess.verify", split, check=False)
    assert proc.returncode != 0 and message in proc.stderr


def test_a_shard_that_crashes_the_reader_is_named(split, monkeypatch):
    """A damaged page can make LMDB read past its file (SIGBUS, which no process catches in itself): verify reads
    in a child process and names the shard it was reading."""
    import os
    import signal

    from preprocess import verify as verify_module
    original = verify_module.verify

    def crashing(root, *, quiet=False, on_shard=None):
        def on(path):
            on_shard(path)
            if path.endswith("shard-00001"):
                os.kill(os.getpid(), signal.SIGBUS)
        return original(root, quiet=quiet, on_shard=on)

    monkeypatch.setattr(verify_module, "verify", crashing)
    with pytest.raises(verify_module.VerifyError, match=r"shard-00001: reading it crashed the reader \(signal SIGBUS\)"):
        verify_module._in_child(str(split), True)
