"""The builder under hostile input: it never deletes what is not its own, never publishes a torn split, never packs
an image twice or under another class's label, never hangs or eats the machine, and explains what it refuses."""
import hashlib
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from preprocess.build_lmdb import build
from preprocess.sources import SourceError, open_source
from tests.conftest import ROOT, run_cli, write_image_folder
from tests.preprocess.test_build import read_plain


def snapshot(root):
    """{relative path: sha256} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def src(tmp_path, rng):
    root = tmp_path / "src"
    write_image_folder(str(root), ["a", "b", "c"], 4, rng, size=(40, 30))
    return root


@pytest.mark.parametrize("where", ["same", "out_inside_src", "src_inside_out"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_and_src_may_not_contain_each_other(src, tmp_path, where, overwrite):
    if where == "src_inside_out":
        outer = tmp_path / "outer"
        os.rename(src, tmp_path / "moved")
        outer.mkdir()
        os.rename(tmp_path / "moved", outer / "src")
        src, out = outer / "src", outer
    else:
        out = src if where == "same" else src / "a" / "packed"
    before = snapshot(tmp_path)
    proc = run_cli("preprocess.build_lmdb", src, out, "--size", 16, "--quiet", *(["--overwrite"] if overwrite else []),
                   check=False)
    assert proc.returncode == 2, proc.stderr
    assert str(os.path.realpath(src)) in proc.stderr and str(os.path.realpath(out)) in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_a_packed_split(src, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\chapter{Five years of work}\n")
    proc = run_cli("preprocess.build_lmdb", src, thesis, "--size", 16, "--quiet", "--overwrite", check=False)
    assert proc.returncode == 2 and "not a packed split" in proc.stderr and str(thesis) in proc.stderr
    assert (thesis / "thesis.tex").read_text().startswith("\\chapter")
    partial = tmp_path / "thesis.partial"  # a folder that only looks like a leftover build
    partial.mkdir()
    (partial / "notes.txt").write_text("mine\n")
    proc = run_cli("preprocess.build_lmdb", src, tmp_path / "thesis", "--size", 16, "--quiet", "--overwrite",
                   check=False)
    assert proc.returncode == 2 and (partial / "notes.txt").exists()
    out = tmp_path / "split"
    run_cli("preprocess.build_lmdb", src, out, "--size", 16, "--quiet")
    run_cli("preprocess.build_lmdb", src, out, "--size", 24, "--quiet", "--overwrite")  # a split: replaced
    assert read_plain(out)[0]["size"] == 24
    empty = tmp_path / "empty"
    empty.mkdir()
    run_cli("preprocess.build_lmdb", src, empty, "--size", 16, "--quiet")  # an empty folder is fine
    assert read_plain(empty)[0]["num_records"] == 12


def test_out_that_is_a_file_is_refused(src, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    for extra in ([], ["--overwrite"]):
        proc = run_cli("preprocess.build_lmdb", src, out, "--quiet", *extra, check=False)
        assert proc.returncode == 2 and str(out) in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "not a folder"


def test_two_concurrent_builds_leave_one_valid_split_and_one_refusal(tmp_path, rng):
    big = tmp_path / "big"
    write_image_folder(str(big), ["x", "y"], 150, rng, size=(320, 240))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "preprocess.build_lmdb", str(big), str(out), "--size", 64, "--workers", 1,
           "--commit-every", 16, "--quiet", "--overwrite"]
    first = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "out.partial" / "plan.json").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # the first build is mid-way, however fast this machine is
    try:
        second = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert f"another build (pid {first.pid}) is writing {out}" in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    meta, records = read_plain(out)
    assert meta["num_records"] == len(records) == 300
    resumed = run_cli("preprocess.build_lmdb", big, out, "--size", 64, "--resume", check=False)
    assert resumed.returncode == 0 and "complete" in resumed.stdout + resumed.stderr


def test_symlink_loops_pack_each_image_once_with_its_own_label(src, tmp_path):
    (src / "a" / "sub").mkdir()
    os.symlink("..", src / "a" / "sub" / "up")   # a/sub/up -> a: a loop inside the class
    os.symlink("..", src / "b" / "root")         # b/root -> SRC: would pack a and c under b
    os.symlink(".", src / "c" / "self1")         # two self-links: c/self1/self2/self1/... forever
    os.symlink(".", src / "c" / "self2")
    os.symlink("../a", src / "c" / "other")      # c/other -> a: a's images under c's label
    source = open_source(str(src))
    assert len(source) == 12
    for i in range(len(source)):
        assert source.classes[source.label(i)] == source.name(i).split("/")[0]
    assert sorted(source.name(i) for i in range(12)) == sorted(
        f"{c}/img_{k}.jpg" for c in "abc" for k in range(4))
    reported = sorted(n["source"] for n in source.skipped)
    assert reported == ["a/sub/up", "b/root", "c/other", "c/self1", "c/self2"]
    out = tmp_path / "out"
    build(str(src), str(out), size=16, quiet=True)
    meta = read_plain(out)[0]
    assert meta["num_records"] == 12
    assert sorted(s["source"] for s in meta["skipped"]) == reported
    assert all("symlink" in s["reason"] for s in meta["skipped"])


def test_a_fifo_is_skipped_not_waited_for(src, tmp_path):
    os.mkfifo(src / "a" / "x.jpg")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "preprocess.build_lmdb", str(src), str(out), "--size", "16",
                           "--quiet", "--workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    meta = read_plain(out)[0]
    assert meta["num_records"] == 12
    assert [(s["source"], s["reason"]) for s in meta["skipped"]] == [("a/x.jpg", "not a regular file: fifo")]


def test_a_list_file_with_a_fifo_skips_it(src, tmp_path):
    os.mkfifo(src / "pipe.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("a/img_0.jpg 0\npipe.jpg 1\n")
    out = tmp_path / "out"
    build(str(listing), str(out), root=str(src), size=16, quiet=True)
    meta = read_plain(out)[0]
    assert meta["num_records"] == 1 and meta["skipped"][0]["source"] == "pipe.jpg"


@pytest.mark.parametrize("kind", ["list", "hdf5"])
def test_a_huge_label_is_refused_at_once(src, tmp_path, kind):
    if kind == "list":
        path = tmp_path / "list.txt"
        path.write_text("a/img_0.jpg 0\na/img_1.jpg 99999999999\n")
        match = r"list.txt:2: label 99999999999"
    else:
        path = tmp_path / "x.h5"
        with h5py.File(path, "w") as f:
            f["images"] = np.zeros((2, 8, 8, 3), np.uint8)
            f["labels"] = np.array([0, 99999999999])
        match = r"label 99999999999 at input 1"
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=match):
        open_source(str(path), root=str(src))
    assert time.monotonic() - t0 < 1.0


def test_a_list_file_reports_duplicates_and_refuses_escapes(src, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("a/img_0.jpg 0\nb/img_0.jpg 1\na/img_0.jpg 2\n")
    source = open_source(str(listing), root=str(src))
    assert [n["source"] for n in source.warnings] == ["a/img_0.jpg"]
    assert "lines 1 and 3" in source.warnings[0]["reason"] and "labels 0 and 2" in source.warnings[0]["reason"]
    out = tmp_path / "out"
    build(str(listing), str(out), root=str(src), size=16, quiet=True)
    assert "lines 1 and 3" in capsys.readouterr().err
    assert read_plain(out)[0]["warnings"] == source.warnings
    escape = tmp_path / "escape.txt"
    escape.write_text("a/img_0.jpg 0\n../../../../etc/passwd 1\n")
    with pytest.raises(SourceError, match=r"escape.txt:2: .*outside --root"):
        open_source(str(escape), root=str(src))
    allowed = open_source(str(escape), root=str(src), allow_outside_root=True)
    assert len(allowed) == 2


def test_resume_of_a_finished_split_says_it_is_complete(src, tmp_path):
    out = tmp_path / "out"
    run_cli("preprocess.build_lmdb", src, out, "--size", 16, "--quiet")
    before = snapshot(out)
    proc = run_cli("preprocess.build_lmdb", src, out, "--size", 16, "--resume")
    assert "complete" in proc.stdout + proc.stderr and snapshot(out) == before



def test_a_full_disk_says_so_and_resume_finishes_once_there_is_room(tmp_path, rng, small_disk):
    disk = small_disk("2M")
    big = tmp_path / "big"
    write_image_folder(str(big), ["x", "y"], 120, rng, size=(96, 96))
    out = disk / "out"
    proc = run_cli("preprocess.build_lmdb", big, out, "--size", 64, "--encoding", "raw", "--workers", 1,
                   "--commit-every", 8, "--quiet", check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{out}.partial" in err and "no space left" in err and "--resume" in err and "MiB more are needed" in err
    subprocess.run(["mount", "-o", "remount,size=16M", str(disk)], check=True)
    run_cli("preprocess.build_lmdb", big, out, "--size", 64, "--encoding", "raw", "--workers", 1, "--resume",
            "--quiet")
    meta, records = read_plain(out)
    assert meta["num_records"] == len(records) == 240


def test_links_into_src_never_change_a_label_and_links_out_are_followed_once(tmp_path, rng):
    data = tmp_path / "data"
    src = data / "train"
    write_image_folder(str(src), ["a", "b"], 2, rng, size=(40, 30))
    write_image_folder(str(src / "b"), ["sub"], 1, rng, size=(40, 30))        # b/sub/img_0.jpg, a real folder
    write_image_folder(str(data / "val"), ["a"], 1, rng, size=(40, 30))       # beside SRC, not in it
    outside = tmp_path / "extra"
    write_image_folder(str(outside), ["more"], 2, rng, size=(40, 30))
    os.symlink("../b/sub", src / "a" / "link")       # into SRC, another class's real folder
    os.symlink("../..", src / "b" / "up")            # to a folder holding SRC: would pack val/ as class b
    os.symlink(str(outside / "more"), src / "a" / "ext")   # out of SRC: followed
    os.symlink(str(outside / "more"), src / "a" / "ext2")  # the same folder again: once
    source = open_source(str(src))
    packed = sorted((source.name(i), source.classes[source.label(i)]) for i in range(len(source)))
    assert packed == [("a/ext/img_0.jpg", "a"), ("a/ext/img_1.jpg", "a"), ("a/img_0.jpg", "a"), ("a/img_1.jpg", "a"),
                      ("b/img_0.jpg", "b"), ("b/img_1.jpg", "b"), ("b/sub/img_0.jpg", "b")]
    assert sorted(s["source"] for s in source.skipped) == ["a/ext2", "a/link", "b/up"]


def test_a_class_folder_linking_inside_src_is_refused(src):
    os.symlink("a", src / "d")
    with pytest.raises(SourceError, match=r"d: class folder is a link to .*remove the link"):
        open_source(str(src))
