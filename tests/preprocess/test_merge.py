"""Parts built by separate processes and merged, against a single build of the same input read with plain
lmdb + msgpack; the merge's refusals; a part killed and resumed; reading version 1 splits."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from datasets import LMDBDataset, make_loader
from preprocess.build_lmdb import BuildError, build, part_from_env
from preprocess.merge import MergeError, merge
from tests.conftest import ROOT, encode, random_rgb, run_cli
from tests.preprocess import imagenet_like as il
from tests.preprocess.test_build import _kill_mid_build, read_plain

ARGS = ["--size", 72, "--shards", 2, "--mean-image", "--quiet"]


@pytest.fixture
def train_tar(tmp_path, rng):
    il.write_train_tar(str(tmp_path / "train.tar"), il.train_images(rng, per_class=7))
    return tmp_path / "train.tar"


def build_parts(src, folder, k, *extra):
    """K parts built by K processes at once, as K machines would."""
    procs = [subprocess.Popen([sys.executable, "-m", "preprocess.build_lmdb", str(src), str(folder / f"p{i}"),
                               *map(str, ARGS), "--workers", "1", "--part", str(i), "--parts", str(k), *extra],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for i in range(k)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    return [folder / f"p{i}" for i in range(k)]


def test_three_parts_from_three_processes_merge_into_a_single_build(train_tar, tmp_path):
    parts = build_parts(train_tar, tmp_path, 3)
    run_cli("preprocess.build_lmdb", train_tar, tmp_path / "whole", *ARGS, "--workers", 2)
    proc = run_cli("preprocess.merge", tmp_path / "merged", parts[2], parts[0], parts[1])  # any order
    assert "3 parts" in proc.stderr and "linked" in proc.stderr
    meta, records = read_plain(tmp_path / "merged")
    ref_meta, ref_records = read_plain(tmp_path / "whole")
    assert records == ref_records  # the single build's records, in its seeded order, not only as a multiset
    for key in ("mean_rgb", "std_rgb", "pca_eigval", "pca_eigvec", "stats", "classes", "size", "encoding"):
        assert meta[key] == ref_meta[key], key
    assert np.array_equal(np.load(tmp_path / "merged" / "mean_image.npy"), np.load(tmp_path / "whole" / "mean_image.npy"))
    part_records = [read_plain(p)[1] for p in parts]
    assert sum(map(len, part_records)) == len(records) and all(len(r) in (9, 10) for r in part_records)
    assert not os.path.exists(tmp_path / "merged.partial")
    for shard, part_shard in zip(meta["shards"], [s for p in parts for s in json.loads((p / "meta.json").read_text())["shards"]]):
        assert os.path.samefile(tmp_path / "merged" / shard["path"] / "data.mdb",
                                os.path.join(parts[meta["shards"].index(shard) // 2], part_shard["path"], "data.mdb"))
    run_cli("preprocess.verify", tmp_path / "merged", "--quiet")
    # the loader reads every record once per epoch, in worker processes, and train.py trains on it
    labels = [int(x) for _, y in make_loader(tmp_path / "merged", batch_size=4, train=True, workers=2) for x in y]
    assert sorted(labels) == sorted(r["label"] for r in ref_records) and len(LMDBDataset(tmp_path / "merged")) == 28
    proc = subprocess.run([sys.executable, "train.py", "configs/demo.yaml", f"data.train={tmp_path / 'merged'}",
                           f"data.val={tmp_path / 'merged'}", f"out_dir={tmp_path / 'run'}", "train.epochs=1",
                           "train.batch_size=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "best.pt").exists()


def test_merge_refuses_parts_that_do_not_make_one_split(train_tar, tmp_path):
    parts = build_parts(train_tar, tmp_path, 3)
    build(str(train_tar), str(tmp_path / "small"), size=24, shards=2, quiet=True, part=1, parts=3, workers=1)
    build(str(train_tar), str(tmp_path / "whole"), size=72, quiet=True, workers=1)
    shutil.copytree(parts[1], tmp_path / "copy_of_p1")

    def refused(match, *given):
        with pytest.raises(MergeError, match=match):
            merge(str(tmp_path / "m"), [str(p) for p in given], quiet=True)
        assert not os.path.exists(tmp_path / "m")

    refused(r"small: size 24, but .*p0 has 72", parts[0], tmp_path / "small", parts[2])
    refused(r"part\(s\) 2 of 3 missing", parts[0], parts[1])
    refused(r"p1: given twice", parts[0], parts[1], parts[1], parts[2])
    refused(r"copy_of_p1: part 1 of 3 again \(also .*p1\)", parts[0], parts[1], tmp_path / "copy_of_p1", parts[2])
    refused(r"whole: a whole split, not a part", parts[0], tmp_path / "whole")
    build(str(train_tar), str(tmp_path / "seeded"), size=72, shards=2, quiet=True, part=1, parts=3, workers=1,
          mean_image=True, seed=5)
    refused(r"seeded: built with seed 5, but .*p0 with 0", parts[0], tmp_path / "seeded", parts[2])
    shutil.copytree(parts[1], tmp_path / "p1_no_sum")
    os.truncate(tmp_path / "p1_no_sum" / "image_sum.npy", 100)
    refused(r"p1_no_sum/image_sum.npy: unreadable", parts[0], tmp_path / "p1_no_sum", parts[2])
    meta = json.loads((parts[1] / "meta.json").read_text())
    shutil.copytree(parts[1], tmp_path / "p1_damaged")
    (tmp_path / "p1_damaged" / "meta.json").write_text(json.dumps({**meta, "part": {**meta["part"], "inputs": [3]}}))
    refused(r"p1_damaged/meta.json: field part is damaged", parts[0], tmp_path / "p1_damaged", parts[2])
    shutil.copytree(parts[2], tmp_path / "p2_rsync_cut")  # a part copied from another machine, cut short
    data = tmp_path / "p2_rsync_cut" / "shard-00001" / "data.mdb"
    os.truncate(data, os.path.getsize(data) // 2)
    refused(r"p2_rsync_cut/shard-00001/data.mdb: .* the file is truncated", parts[0], parts[1], tmp_path / "p2_rsync_cut")
    proc = run_cli("preprocess.merge", tmp_path / "m", parts[0], check=False)
    assert proc.returncode == 2 and "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_a_part_whose_inputs_are_all_skipped_is_built_and_merged(tmp_path, rng):
    """Four inputs, two undecodable, four parts: the parts holding a bad input are empty splits, and the merge
    still equals the single build."""
    il.write_folder(str(tmp_path / "src"), {"a": {"x.jpg": encode(random_rgb(rng, 40, 40)), "y.jpg": b"bad"},
                                             "b": {"x.jpg": b"also bad", "y.jpg": encode(random_rgb(rng, 40, 40))}})
    for i in range(4):
        build(str(tmp_path / "src"), str(tmp_path / f"p{i}"), size=24, quiet=True, part=i, parts=4, workers=1)
    build(str(tmp_path / "src"), str(tmp_path / "whole"), size=24, quiet=True, workers=1)
    merge(str(tmp_path / "m"), [str(tmp_path / f"p{i}") for i in range(4)], quiet=True)
    meta, records = read_plain(tmp_path / "m")
    ref_meta, ref_records = read_plain(tmp_path / "whole")
    assert records == ref_records and meta["stats"] == ref_meta["stats"]
    assert sorted(s["source"] for s in meta["skipped"]) == sorted(s["source"] for s in ref_meta["skipped"])


def test_parts_of_other_inputs_are_refused(train_tar, tmp_path, rng):
    build(str(train_tar), str(tmp_path / "a0"), size=32, quiet=True, part=0, parts=2, workers=1)
    il.write_train_tar(str(tmp_path / "other.tar"), il.train_images(rng, per_class=7))
    build(str(tmp_path / "other.tar"), str(tmp_path / "b1"), size=32, quiet=True, part=1, parts=2, workers=1)
    with pytest.raises(MergeError, match="a part of another input"):
        merge(str(tmp_path / "m"), [str(tmp_path / "a0"), str(tmp_path / "b1")], quiet=True)


@pytest.mark.slow
def test_a_part_killed_with_kill9_resumes_to_the_same_part(tmp_path, rng):
    images = il.train_images(rng, per_class=40, size=(300, 240))
    il.write_folder(str(tmp_path / "src"), images)
    args = ["--size", 48, "--shards", 2, "--commit-every", 4, "--part", 1, "--parts", 2, "--quiet"]
    run_cli("preprocess.build_lmdb", tmp_path / "src", tmp_path / "ref", *args, "--workers", 1)
    out, partial = tmp_path / "p1", tmp_path / "p1.partial"
    cmd = [sys.executable, "-m", "preprocess.build_lmdb", str(tmp_path / "src"), str(out), *map(str, args)]
    _kill_mid_build(cmd + ["--workers", "1"], partial, out)
    proc = run_cli("preprocess.build_lmdb", tmp_path / "src", out, *args, "--workers", 1, "--parts", 3, "--resume",
                   check=False)
    assert proc.returncode == 2 and "'parts' was 2 and is now 3" in proc.stderr
    run_cli("preprocess.build_lmdb", tmp_path / "src", out, *args, "--workers", 2, "--resume")
    meta, records = read_plain(out)
    ref_meta, ref_records = read_plain(tmp_path / "ref")
    assert records == ref_records and meta["part"] == ref_meta["part"] and meta["stats"] == ref_meta["stats"]


def test_merge_onto_another_filesystem_copies_and_says_so(train_tar, tmp_path, small_disk):
    parts = build_parts(train_tar, tmp_path, 2)
    disk = small_disk("64m")
    proc = run_cli("preprocess.merge", disk / "merged", *parts)
    assert "copied (parts on another filesystem)" in proc.stderr
    run_cli("preprocess.verify", disk / "merged", "--quiet")


def test_merge_replaces_only_with_overwrite_and_clears_an_interrupted_merge(train_tar, tmp_path):
    parts = build_parts(train_tar, tmp_path, 2)
    (tmp_path / "m.partial").mkdir()
    (tmp_path / "m.partial" / "merge.json").write_text("{}")  # a merge killed half-way
    (tmp_path / "m.partial" / "shard-00000").mkdir()
    merge(str(tmp_path / "m"), [str(p) for p in parts], quiet=True)
    with pytest.raises(MergeError, match="already exists; pass --overwrite"):
        merge(str(tmp_path / "m"), [str(p) for p in parts], quiet=True)
    merge(str(tmp_path / "m"), [str(p) for p in parts], quiet=True, overwrite=True)
    assert len(read_plain(tmp_path / "m")[1]) == 28


def test_part_and_parts_default_to_slurm_and_kubernetes():
    assert part_from_env(None, None, {}) == (None, None)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert part_from_env(None, "env", slurm) == (2, 4)  # --parts without a number; task IDs 3..6
    stepped = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}
    assert part_from_env(None, 4, stepped) == (2, 4)  # --array=1-7:2 runs tasks 1, 3, 5, 7
    for env, name in (({"JOB_COMPLETION_INDEX": "abc"}, "JOB_COMPLETION_INDEX='abc' is not an integer"),
                      ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"},
                       "not on the array's steps")):
        with pytest.raises(BuildError, match=name):
            part_from_env(None, 4, env)
    assert part_from_env(None, 8, {"JOB_COMPLETION_INDEX": "7"}) == (7, 8)
    assert part_from_env(1, 8, slurm) == (1, 8)  # given wins
    with pytest.raises(BuildError, match="SLURM_ARRAY_TASK_COUNT, which is not set"):
        part_from_env(None, "env", {})
    proc = subprocess.run([sys.executable, "-m", "preprocess.build_lmdb", "src", "out", "--parts", "2"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "JOB_COMPLETION_INDEX": "x"})
    assert proc.returncode == 2 and "is not an integer" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(BuildError, match="without --part"):
        part_from_env(None, 3, {})


def test_part_options_are_checked(train_tar, tmp_path):
    for kw, match in (({"part": 3, "parts": 3}, "must be in 0..2"), ({"part": 0}, "go together"),
                      ({"part": 0, "parts": 1000}, "only 28 inputs")):
        with pytest.raises(BuildError, match=match):
            build(str(train_tar), str(tmp_path / "o"), size=32, quiet=True, workers=1, **kw)


def test_version_1_splits_are_still_read(train_tar, tmp_path):
    build(str(train_tar), str(tmp_path / "s"), size=32, shards=3, quiet=True, workers=1)
    before = LMDBDataset(tmp_path / "s").records(range(28))
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["version"] = 1
    for shard in meta["shards"]:
        del shard["first_key"]
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    assert LMDBDataset(tmp_path / "s").records(range(28)) == before
    run_cli("preprocess.verify", tmp_path / "s", "--quiet")
    meta["version"] = 2  # version 2 without first_key is damaged, and said so
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    proc = run_cli("preprocess.verify", tmp_path / "s", check=False)
    assert proc.returncode != 0 and "shards[0].first_key" in proc.stderr


@pytest.mark.parametrize("edit,says", [
    (lambda m: {**m, "skipped": "none"}, "field skipped is 'none', not a list"),
    (lambda m: {k: v for k, v in m.items() if k != "stats"}, "field stats is None, not a dict"),
    (lambda m: {k: v for k, v in m.items() if k != "build"}, "field build is None, not a dict"),
    (lambda m: {**m, "stats": {**m["stats"], "images": m["stats"]["images"] + 1}},
     "its statistics do not count its records"),
    (lambda m: {**m, "num_records": m["num_records"] + 1, "shards": [{**m["shards"][0], "num_records":
               m["shards"][0]["num_records"] + 1, "stats": {**m["shards"][0]["stats"], "images":
               m["shards"][0]["stats"]["images"] + 1}}, *m["shards"][1:]],
                  "stats": {**m["stats"], "images": m["stats"]["images"] + 1}},
     r"shard-00000: holds \d+ records keyed \d+..\d+, but its meta.json says"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "first_key": m["shards"][0]["first_key"] + 1},
                                *m["shards"][1:]]}, r"shard-00000: holds .* but its meta.json says"),
])
def test_hand_edited_parts_are_refused_naming_the_field(train_tar, tmp_path, edit, says):
    """A part is checked, not trusted: its fields' types, its counts against its statistics, and its shards'
    records against its counts and keys (each of these merged with exit 0 into a split verify refused)."""
    parts = build_parts(train_tar, tmp_path, 2)
    meta = json.loads((parts[1] / "meta.json").read_text())
    (parts[1] / "meta.json").write_text(json.dumps(edit(meta)))
    with pytest.raises(MergeError, match=says):
        merge(str(tmp_path / "m"), [str(p) for p in parts], quiet=True)
    assert not (tmp_path / "m").exists()
    proc = run_cli("preprocess.merge", tmp_path / "m", *parts, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_a_part_rebuilt_during_the_merge_is_refused(train_tar, tmp_path, monkeypatch):
    """A part rebuilt (--overwrite) while the merge links it: the merge notices and publishes nothing."""
    from preprocess import merge as merge_module
    parts = build_parts(train_tar, tmp_path, 2)
    real = merge_module._link

    def link_then_rebuild(src, dst):
        linked = real(src, dst)
        if not (tmp_path / "rebuilt").exists():
            (tmp_path / "rebuilt").write_text("")
            build(str(train_tar), str(parts[0]), size=72, shards=2, quiet=True, part=0, parts=2, workers=1, quality=80,
                  mean_image=True, overwrite=True)
        return linked

    monkeypatch.setattr(merge_module, "_link", link_then_rebuild)
    with pytest.raises(MergeError, match="p0: its meta.json changed during the merge"):
        merge(str(tmp_path / "m"), [str(p) for p in parts], quiet=True)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("point", ["before the publish", "between the renames", "before the old split is removed"])
def test_a_merge_killed_at_each_step_of_its_publish_is_finished_by_the_same_command(train_tar, tmp_path,
                                                                                   monkeypatch, point):
    """Replacing an existing split: stopped after its meta.json is written (its marker gone), after OUT was moved
    aside, or before the old split was removed. The same command then publishes a split equal to an uninterrupted
    merge and leaves nothing beside OUT (it refused for ever, or left OUT.old-PID)."""
    from preprocess import build_lmdb, merge as merge_module
    parts = [str(p) for p in build_parts(train_tar, tmp_path, 2)]
    merge(str(tmp_path / "ref"), parts, quiet=True)
    out = tmp_path / "m"
    build(str(train_tar), str(out), size=24, quiet=True, workers=1)  # the split being replaced
    with monkeypatch.context() as m:
        if point == "before the publish":
            m.setattr(merge_module, "_publish", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        elif point == "between the renames":
            real_rename, calls = os.rename, []

            def rename(src, dst):
                calls.append(src)
                if len(calls) == 2:
                    raise KeyboardInterrupt
                real_rename(src, dst)
            m.setattr(build_lmdb.os, "rename", rename)
        else:
            m.setattr(build_lmdb.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            merge(str(out), parts, quiet=True, overwrite=True)
    proc = run_cli("preprocess.merge", out, *parts, "--overwrite", check=False)
    assert proc.returncode == 0, proc.stderr
    assert read_plain(out)[1] == read_plain(tmp_path / "ref")[1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m.")) == []
    if point != "before the publish":
        assert "removed" in proc.stderr and "m.old-" in proc.stderr
