"""Tar archives read in place, and ImageNet's validation labels, against folder builds of the same images and
labels worked out by the test from what it wrote."""
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import zlib

import pytest

from preprocess.build_lmdb import build
from preprocess.sources import SourceError
from tests.conftest import ROOT, encode, random_rgb, run_cli
from tests.preprocess import imagenet_like as il
from tests.preprocess.test_build import read_plain


@pytest.fixture
def train(tmp_path, rng):
    """The same training images as an ImageFolder tree, an ILSVRC-style tar of class tars, and the folder's
    split (the class list val builds take)."""
    images = il.train_images(rng)
    il.write_folder(str(tmp_path / "train"), images)
    il.write_train_tar(str(tmp_path / "train.tar"), images)
    build(str(tmp_path / "train"), str(tmp_path / "train_split"), size=32, quiet=True, workers=1)
    return tmp_path, images


def test_train_tar_of_class_tars_equals_the_folder_build(train):
    tmp, images = train
    run_cli("preprocess.build_lmdb", tmp / "train.tar", tmp / "from_tar", "--size", 32, "--workers", 2,
            "--shards", 2, "--quiet")
    run_cli("preprocess.build_lmdb", tmp / "train", tmp / "from_folder", "--size", 32, "--workers", 2,
            "--shards", 2, "--quiet")
    meta_t, recs_t = read_plain(tmp / "from_tar")
    meta_f, recs_f = read_plain(tmp / "from_folder")
    assert recs_t == recs_f  # same labels, sources, bytes and order
    assert meta_t["classes"] == il.WNIDS and meta_t["stats"] == meta_f["stats"]
    assert sorted(r["source"] for r in recs_t) == sorted(f"{w}/{n}" for w in images for n in images[w])
    for r in recs_t:
        assert meta_t["classes"][r["label"]] == r["source"].split("/")[0]


def test_plain_tar_of_class_paths_with_odd_members(tmp_path, rng):
    imgs = {f"{c}/{sub}img{k}.jpg": encode(random_rgb(rng, 40, 50)) for c in ("cat", "bird")
            for sub in ("", "deep/") for k in range(2)}
    for rel, data in imgs.items():
        os.makedirs(tmp_path / "folder" / os.path.dirname(rel), exist_ok=True)
        (tmp_path / "folder" / rel).write_bytes(data)
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        tf.add(tmp_path / "folder" / "cat", arcname="./cat", recursive=False)  # a directory member
        for rel, data in imgs.items():
            il.add_bytes(tf, "./" + rel if rel.startswith("cat") else rel, data)
        il.add_bytes(tf, "bird/notes.txt", b"not an image")
        il.add_bytes(tf, "../evil.jpg", imgs["cat/img0.jpg"])
        link = tarfile.TarInfo("bird/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        il.add_bytes(tf, "cat/img1.jpg", b"an older copy, replaced by the next member")
        il.add_bytes(tf, "cat/img1.jpg", imgs["cat/img1.jpg"])
    build(str(tmp_path / "a.tar"), str(tmp_path / "t"), size=24, quiet=True, workers=1)
    build(str(tmp_path / "folder"), str(tmp_path / "f"), size=24, quiet=True, workers=1)
    meta_t, recs_t = read_plain(tmp_path / "t")
    meta_f, recs_f = read_plain(tmp_path / "f")
    assert recs_t == recs_f
    reasons = {s["source"]: s["reason"] for s in meta_t["skipped"]}
    assert "leaves the archive" in reasons["../evil.jpg"] and "not followed" in reasons["bird/link.jpg"]
    assert any(w["source"] == "cat/img1.jpg" and "twice" in w["reason"] for w in meta_t["warnings"])


def test_truncated_archive_and_truncated_member_are_skipped_and_reported(tmp_path, rng):
    jpeg = encode(random_rgb(rng, 60, 60))
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        for k in range(3):
            il.add_bytes(tf, f"c/ok{k}.jpg", encode(random_rgb(rng, 60, 60)))
        il.add_bytes(tf, "c/cut.jpg", jpeg[:len(jpeg) // 2])  # a truncated file, inside a whole archive
        il.add_bytes(tf, "c/last.jpg", jpeg)
    data = (tmp_path / "a.tar").read_bytes()
    end_of_last = data.index(jpeg) + len(jpeg) // 3
    (tmp_path / "cut.tar").write_bytes(data[:end_of_last])  # the archive cut inside its last member
    proc = run_cli("preprocess.build_lmdb", tmp_path / "cut.tar", tmp_path / "out", "--size", 24, "--workers", 1)
    meta, recs = read_plain(tmp_path / "out")
    assert sorted(r["source"] for r in recs) == ["c/ok0.jpg", "c/ok1.jpg", "c/ok2.jpg"]
    reasons = {s["source"]: s["reason"] for s in meta["skipped"]}
    assert reasons["c/cut.jpg"].startswith("truncated JPEG")
    assert reasons["c/last.jpg"].startswith("truncated") and "archive ends" in reasons["c/last.jpg"]
    assert f"the archive ends {len(jpeg) // 3} bytes into this {len(jpeg)}-byte member" in reasons["c/last.jpg"]
    assert "cut short" in reasons[str(tmp_path / "cut.tar")] and "cut short" in proc.stderr
    strict = run_cli("preprocess.build_lmdb", tmp_path / "cut.tar", tmp_path / "o2", "--strict", check=False)
    assert strict.returncode == 2 and "cut short" in strict.stderr and "--strict" in strict.stderr


def test_kaggle_labels_on_a_flat_tar_and_a_flat_folder(train, rng):
    tmp, _ = train
    vals = il.val_images(rng, n=12)
    il.write_val_tar(str(tmp / "val.tar"), vals)
    il.write_val_flat(str(tmp / "val_flat"), vals)
    il.write_val_sorted(str(tmp / "val_sorted"), vals)
    csv_path = il.write_kaggle(str(tmp / "kaggle"), vals)
    expected = {name: il.WNIDS.index(w) for name, w, _ in vals}  # the train split's classes are sorted WNIDs
    build(str(tmp / "val_sorted"), str(tmp / "v_sorted"), size=32, quiet=True, workers=1,
          classes_from=str(tmp / "train_split"))
    _, sorted_recs = read_plain(tmp / "v_sorted")
    by_name = {os.path.basename(r["source"]): (r["label"], r["image"]) for r in sorted_recs}
    for src in ("val.tar", "val_flat"):
        run_cli("preprocess.build_lmdb", tmp / src, tmp / f"v_{src}", "--size", 32, "--labels", csv_path,
                "--classes-from", tmp / "train_split", "--quiet")
        meta, recs = read_plain(tmp / f"v_{src}")
        assert {r["source"]: r["label"] for r in recs} == expected
        assert {r["source"]: (r["label"], r["image"]) for r in recs} == by_name
        assert meta["class_names"] == [il.WORDS[w] for w in il.WNIDS]
        assert meta["classes"] == il.WNIDS


def test_devkit_ground_truth_with_meta_mat_ids_not_in_wnid_order(train, rng):
    tmp, _ = train
    vals = il.val_images(rng, n=16)
    il.write_val_flat(str(tmp / "val_flat"), vals)
    gt = il.write_devkit(str(tmp / "devkit" / "data"), vals)
    il.write_val_sorted(str(tmp / "val_sorted"), vals)
    build(str(tmp / "val_sorted"), str(tmp / "v_sorted"), size=32, quiet=True, workers=1,
          classes_from=str(tmp / "train_split"))  # what users do today: sort into folders, then build
    expected = {os.path.basename(r["source"]): r["label"] for r in read_plain(tmp / "v_sorted")[1]}
    assert expected == {name: il.WNIDS.index(w) for name, w, _ in vals}
    assert any(il.DEVKIT_IDS[w] - 1 != expected[n] for n, w, _ in vals)  # ID − 1 would be wrong
    for extra in (["--classes-from", tmp / "train_split"], []):  # without it: the devkit's sorted leaves
        out = tmp / f"v{len(extra)}"
        run_cli("preprocess.build_lmdb", tmp / "val_flat", out, "--size", 32, "--labels", gt, "--quiet", *extra)
        meta, recs = read_plain(out)
        assert {r["source"]: r["label"] for r in recs} == expected
        assert meta["classes"] == il.WNIDS and meta["class_names"] == [il.WORDS[w] for w in il.WNIDS]


def test_class_names_for_a_train_tar_and_inherited_by_val(train, rng):
    tmp, _ = train
    il.write_kaggle(str(tmp / "kaggle"), il.val_images(rng, n=2))
    build(str(tmp / "train.tar"), str(tmp / "named"), size=32, quiet=True, workers=1,
          class_names=str(tmp / "kaggle" / "LOC_synset_mapping.txt"))
    assert json.loads((tmp / "named" / "meta.json").read_text())["class_names"] == [il.WORDS[w] for w in il.WNIDS]
    vals = il.val_images(rng, n=4)
    il.write_val_sorted(str(tmp / "vs"), vals)
    build(str(tmp / "vs"), str(tmp / "vnamed"), size=32, quiet=True, workers=1, classes_from=str(tmp / "named"))
    assert json.loads((tmp / "vnamed" / "meta.json").read_text())["class_names"] == [il.WORDS[w] for w in il.WNIDS]


def test_label_file_problems_are_named(train, rng, monkeypatch):
    tmp, _ = train
    vals = il.val_images(rng, n=6)
    il.write_val_flat(str(tmp / "vf"), vals)
    il.write_val_tar(str(tmp / "val.tar"), vals)
    csv_path = il.write_kaggle(str(tmp / "k"), vals[:-1])  # the last image has no label

    def fails(match, src="vf", **kw):
        with pytest.raises(SourceError, match=match):
            build(str(tmp / src), str(tmp / "o"), size=32, quiet=True, workers=1, **kw)

    fails(rf"{vals[-1][0]} has no label in .*LOC_val_solution.csv", labels=csv_path)
    mapping = tmp / "k" / "LOC_synset_mapping.txt"
    lines = mapping.read_text().splitlines()
    used = vals[0][1]
    mapping.write_text("".join(f"{line}\n" for line in lines if not line.startswith(used)))  # another download's
    fails(rf"LOC_val_solution.csv:\d+: class '{used}' of .* is not among the {len(lines) - 1} classes of "
          r".*LOC_synset_mapping.txt beside it", labels=csv_path)
    il.write_kaggle(str(tmp / "k"), vals[:-1])
    fails("and no class folder; give their labels with --labels", src="val.tar")
    gt = il.write_devkit(str(tmp / "dk"), vals)
    os.remove(tmp / "dk" / "meta.mat")
    fails("meta.mat is missing", labels=gt)
    il.write_devkit(str(tmp / "dk"), vals)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    fails("needs SciPy: pip install scipy", labels=gt)
    monkeypatch.undo()
    il.write_val_flat(str(tmp / "one"), vals[:1])
    (tmp / "bad.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n09999999 1 2 3 4\n")
    fails(r"bad.csv:2: class 'n09999999' is not among the --classes-from", src="one", labels=str(tmp / "bad.csv"),
          classes_from=str(tmp / "train_split"))
    (tmp / "ids.txt").write_text("1\n2\nseven\n")
    fails(r"meta.mat is missing", labels=str(tmp / "ids.txt"))
    (tmp / "dk" / "ids.txt").write_text("1\n2\nseven\n")
    fails(r"ids.txt:3: expected one ILSVRC2012_ID, got 'seven'", labels=str(tmp / "dk" / "ids.txt"))
    (tmp / "dk" / "ids.txt").write_text("1\n5\n")  # 5 is the inner node 'fish', not a class
    fails(r"ids.txt:2: ILSVRC2012_ID 5 is not a class of .*meta.mat", labels=str(tmp / "dk" / "ids.txt"))
    (tmp / "other.txt").write_text("img.jpg 3\n")
    fails("neither Kaggle's LOC_val_solution.csv", labels=str(tmp / "other.txt"))


def test_gzip_tar_is_decompressed_once_beside_out_and_resumed(tmp_path, rng):
    imgs = {f"c{k % 2}/{k}.jpg": encode(random_rgb(rng, 40, 50)) for k in range(6)}
    for rel, data in imgs.items():
        os.makedirs(tmp_path / "folder" / os.path.dirname(rel), exist_ok=True)
        (tmp_path / "folder" / rel).write_bytes(data)
    with tarfile.open(tmp_path / "a.tgz", "w:gz") as tf:
        for rel, data in imgs.items():
            il.add_bytes(tf, rel, data)
        il.add_bytes(tf, "c0/broken.jpg", b"not a jpeg")
    (tmp_path / "folder" / "c0" / "broken.jpg").write_bytes(b"not a jpeg")
    build(str(tmp_path / "folder"), str(tmp_path / "f"), size=24, quiet=True, workers=1)
    proc = run_cli("preprocess.build_lmdb", tmp_path / "a.tgz", tmp_path / "t", "--size", 24, "--strict", check=False)
    assert proc.returncode == 2 and "gzip-compressed: decompressing it once" in proc.stderr
    copies = [p for p in os.listdir(tmp_path) if p.startswith("t.source-")]
    assert len(copies) == 1  # kept for the next attempt
    # what a decompression killed half-way (SIGKILL, SIGTERM) leaves, and a copy of another archive's
    killed = [tmp_path / "t.source-0123456789ab.tmp-99999.tar", tmp_path / copies[0].replace(".tar", ".tmp-4242.tar"),
              tmp_path / "t.source-ba9876543210.tar"]
    for k in killed:
        k.write_bytes(b"partial")
    proc = run_cli("preprocess.build_lmdb", tmp_path / "a.tgz", tmp_path / "t", "--size", 24, "--resume")
    assert "reusing its decompressed copy" in proc.stderr
    assert all(f"removed {k}" in proc.stderr and not k.exists() for k in killed)
    meta, recs = read_plain(tmp_path / "t")
    assert recs == read_plain(tmp_path / "f")[1] and meta["skipped"][0]["source"] == "c0/broken.jpg"
    assert not [p for p in os.listdir(tmp_path) if p.startswith("t.source-")]  # removed once complete


def test_a_gzip_tar_cut_short_keeps_what_it_holds(tmp_path, rng):
    with tarfile.open(tmp_path / "a.tgz", "w:gz") as tf:
        for k in range(4):
            il.add_bytes(tf, f"c/{k}.jpg", encode(random_rgb(rng, 200, 200)))
    data = (tmp_path / "a.tgz").read_bytes()
    (tmp_path / "cut.tgz").write_bytes(data[:len(data) * 3 // 4])
    proc = run_cli("preprocess.build_lmdb", tmp_path / "cut.tgz", tmp_path / "o", "--size", 24)
    meta, recs = read_plain(tmp_path / "o")
    assert "gzip stream ends early" in proc.stderr and 1 <= len(recs) < 4
    assert any("cut short" in w["reason"] for w in meta["skipped"])
    plain = zlib.decompress(data, wbits=31)  # the same tar as two concatenated gzip members (cat a.gz b.gz)
    (tmp_path / "two.tgz").write_bytes(gzip.compress(plain[:5000]) + gzip.compress(plain[5000:]))
    build(str(tmp_path / "two.tgz"), str(tmp_path / "two"), size=24, quiet=True, workers=1)
    assert len(read_plain(tmp_path / "two")[1]) == 4
    (tmp_path / "bad.tgz").write_bytes(b"\x1f\x8b" + bytes(100))
    proc = run_cli("preprocess.build_lmdb", tmp_path / "bad.tgz", tmp_path / "o2", check=False)
    assert proc.returncode == 2 and "not a readable gzip file" in proc.stderr


def test_root_picks_a_folder_inside_the_archive(tmp_path, rng):
    """Kaggle's archive: ILSVRC/Data/CLS-LOC/{train,val}/… in one tar."""
    vals = il.val_images(rng, n=4)
    with tarfile.open(tmp_path / "kaggle.tar", "w") as tf:
        for name, w, data in vals:
            il.add_bytes(tf, f"ILSVRC/Data/CLS-LOC/val/{name}", data)
            il.add_bytes(tf, f"ILSVRC/Data/CLS-LOC/train/{w}/{name}", data)
    csv_path = il.write_kaggle(str(tmp_path / "k"), vals)
    build(str(tmp_path / "kaggle.tar"), str(tmp_path / "v"), size=24, quiet=True, workers=1,
          root="ILSVRC/Data/CLS-LOC/val", labels=csv_path)
    build(str(tmp_path / "kaggle.tar"), str(tmp_path / "t"), size=24, quiet=True, workers=1,
          root="ILSVRC/Data/CLS-LOC/train/")
    _, v = read_plain(tmp_path / "v")
    meta_t, t = read_plain(tmp_path / "t")
    assert {r["source"]: r["label"] for r in v} == {n: il.WNIDS.index(w) for n, w, _ in vals}
    assert {r["source"]: meta_t["classes"][r["label"]] for r in t} == {f"{w}/{n}": w for n, w, _ in vals}
    assert {r["image"] for r in v} == {r["image"] for r in t}
    build(str(tmp_path / "kaggle.tar"), str(tmp_path / "v2"), size=24, quiet=True, workers=1,
          root="./ILSVRC/Data/CLS-LOC/train/../val/", labels=csv_path)  # normalised, as a path in the archive
    assert read_plain(tmp_path / "v2")[1] == v
    proc = run_cli("preprocess.build_lmdb", tmp_path / "kaggle.tar", tmp_path / "o", "--root", "ILSVRC/../../x",
                   check=False)
    assert proc.returncode == 2 and "--root ILSVRC/../../x: climbs out of" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_tar_listing_reads_headers_only(tmp_path, rng, monkeypatch):
    """Listing a tar reads its headers, not its images (a 138 GB archive must list in seconds)."""
    big = encode(random_rgb(rng, 600, 800))
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        for k in range(20):
            il.add_bytes(tf, f"c{k % 2}/{k}.jpg", big)
    from preprocess import tar_source
    read = []
    real = os.pread
    monkeypatch.setattr(tar_source.os, "pread", lambda fd, n, off: read.append(n) or real(fd, n, off))
    source = tar_source.list_tar(str(tmp_path / "a.tar"))
    assert len(source) == 20 and sum(read) < 20 * 512 * 4 < 20 * len(big)
    assert [len(d) for d in source.load([3, 17])] == [len(big)] * 2


@pytest.mark.parametrize("members", [1, 5, 23])
def test_members_are_read_where_they_are(tmp_path, rng, members):
    """Each record's bytes are the member's bytes at the offset tarfile itself reports, and a whole archive
    (whatever its padding: GNU tar pads to a multiple of 10240 bytes, after the end marker) has no warning."""
    data = {f"c/{k}.png": encode(random_rgb(rng, 30 + 7 * k, 30), "PNG") for k in range(members)}
    for fmt_, blocking in ((tarfile.GNU_FORMAT, 20), (tarfile.PAX_FORMAT, 64)):
        with open(tmp_path / "a.tar", "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=fmt_) as tf:
                for name, d in data.items():
                    il.add_bytes(tf, name, d)
            f.write(bytes(512 * blocking - f.tell() % (512 * blocking)))  # tar -b 64 pads to 32 KiB records
        from preprocess.tar_source import list_tar
        source = list_tar(str(tmp_path / "a.tar"))
        assert source.warnings == [] and len(source) == members
    with tarfile.open(tmp_path / "a.tar") as tf:
        for i, got in zip(range(len(source)), source.load(range(len(source)))):
            assert got == tf.extractfile(source.name(i)).read() == data[source.name(i)]


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_parser_agrees_with_tarfile(tmp_path, tar_format):
    """The fast header parser reports what tarfile reports, and leaves to tarfile what it does not parse
    (GNU long names, pax headers)."""
    from preprocess.tar_source import _fast_members, _scan
    with tarfile.open(tmp_path / "a.tar", "w", format=tar_format) as tf:
        for k, n in enumerate((0, 1, 511, 512, 513, 5000)):
            il.add_bytes(tf, f"c/f{k}.jpg", bytes([k + 1]) * n)
        il.add_bytes(tf, "deep/" + "x" * 60 + "/" + "y" * 60 + "/img.jpg", b"long path")  # ustar: a prefix
        for kind, name in ((tarfile.DIRTYPE, "c/sub"), (tarfile.SYMTYPE, "c/s.jpg"), (tarfile.LNKTYPE, "c/h.jpg"),
                           (tarfile.FIFOTYPE, "c/p.jpg"), (tarfile.CHRTYPE, "c/d.jpg")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "c/f1.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tf.addfile(info)
        il.add_bytes(tf, "c/é ü.jpg", b"utf-8 name")
    with tarfile.open(tmp_path / "a.tar") as tf:
        expected = [(m.name, m.offset_data, m.size, m.isfile(), m.issparse(), m.linkname if m.islnk() else None)
                    for m in tf.getmembers()]
    size = os.path.getsize(tmp_path / "a.tar")
    members, problem = _scan(str(tmp_path / "a.tar"), 0, size)
    assert members == expected and problem is None
    fd = os.open(tmp_path / "a.tar", os.O_RDONLY)
    try:
        fast = _fast_members(fd, 0, size)
    finally:
        os.close(fd)
    assert (fast is None) == (tar_format == tarfile.PAX_FORMAT or tar_format == tarfile.GNU_FORMAT)


def _folder_and_tar(tmp_path, files, **tar_kw):
    """The same files as a folder and as a tar made by GNU tar itself; returns (folder, tar)."""
    folder = tmp_path / "folder"
    for rel, data in files.items():
        path = os.path.join(os.fsencode(folder), os.fsencode(rel))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    subprocess.run(["tar", "-C", str(folder), *tar_kw.get("args", []), "-cf", str(tmp_path / "a.tar"), "."],
                   check=True)
    return folder, tmp_path / "a.tar"


def test_gnu_tar_archives_equal_folder_builds_with_odd_names_and_hard_links(tmp_path, rng):
    """Archives as GNU tar writes them (incremental format too), with names that are not UTF-8, hold
    backslashes or are long, and a hard link: the same records as the folder."""
    files = {f"cat/{k}.jpg": encode(random_rgb(rng, 30, 40)) for k in range(3)}
    files.update({"dog/a\\b.jpg": encode(random_rgb(rng, 30, 40)), "dog/" + "n" * 120 + ".jpg":
                  encode(random_rgb(rng, 30, 40)), os.fsdecode(b"dog/caf\xe9.jpg"): encode(random_rgb(rng, 30, 40))})
    folder, _ = _folder_and_tar(tmp_path, files)
    os.link(folder / "cat" / "0.jpg", folder / "dog" / "same.jpg")
    build(str(folder), str(tmp_path / "f"), size=24, quiet=True, workers=1)
    _, want = read_plain(tmp_path / "f")
    assert sum(r["source"] == "dog/caf\\xe9.jpg" for r in want) == 1  # escaped, so JSON and msgpack hold it
    for kind, args in (("plain", []), ("incremental", ["--format=gnu", "-g", str(tmp_path / "snar")])):
        os.remove(tmp_path / "a.tar")
        subprocess.run(["tar", "-C", str(folder), *args, "-cf", str(tmp_path / "a.tar"), "."], check=True)
        out = tmp_path / kind
        build(str(tmp_path / "a.tar"), str(out), size=24, quiet=True, workers=1, strict=True)
        meta, got = read_plain(out)
        assert got == want, kind
        assert meta["classes"] == ["cat", "dog"]
        assert any("not UTF-8" in w["reason"] for w in meta["warnings"])


def test_class_tar_layout_problems(tmp_path, rng):
    """An empty class tar is refused (as an empty class folder is); an inner .tar that is no tar, or one cut
    inside its first header, is skipped and reported; a stray top-level image is skipped, as ImageFolder
    ignores it."""
    def outer(path, inner):
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
            for name, data in inner.items():
                il.add_bytes(tf, name, data)

    def class_tar(n):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
            for k in range(n):
                il.add_bytes(t, f"x{k}.JPEG", encode(random_rgb(rng, 30, 30)))
        return buf.getvalue()

    outer(tmp_path / "empty.tar", {"n1.tar": class_tar(2), "n2.tar": class_tar(0), "n3.tar": class_tar(2)})
    with pytest.raises(SourceError, match=r"empty.tar:n2.tar: class tar holds no image files"):
        build(str(tmp_path / "empty.tar"), str(tmp_path / "o"), size=24, quiet=True, workers=1)
    outer(tmp_path / "odd.tar", {"n1.tar": class_tar(2), "README.tar": b"not a tar at all" * 40,
                                 "n3.tar": class_tar(3)[:300], "preview.jpg": encode(random_rgb(rng, 30, 30))})
    build(str(tmp_path / "odd.tar"), str(tmp_path / "o"), size=24, quiet=True, workers=1)
    meta, recs = read_plain(tmp_path / "o")
    assert meta["classes"] == ["n1"] and len(recs) == 2
    reasons = {s["source"].rsplit(":", 1)[-1]: s["reason"] for s in meta["skipped"]}
    assert "not a readable tar" in reasons["README.tar"] and "not a readable tar" in reasons["n3.tar"]
    assert reasons["preview.jpg"] == "outside any class folder; not packed"


def test_labels_apply_to_images_in_a_folder_of_the_archive(tmp_path, rng):
    """`tar cf val.tar val/`: with --labels, every image takes its class from its name, wherever it is."""
    vals = il.val_images(rng, n=6)
    il.write_val_flat(str(tmp_path / "val"), vals)
    subprocess.run(["tar", "-C", str(tmp_path), "-cf", str(tmp_path / "val.tar"), "val"], check=True)
    csv_path = il.write_kaggle(str(tmp_path / "k"), vals)
    with open(csv_path, "rb") as f:
        text = f.read()
    with open(csv_path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + text.replace(b"\n", b"\r\n"))  # a spreadsheet's export: BOM, CRLF
    for src in ("val.tar", "val"):
        build(str(tmp_path / src), str(tmp_path / f"o_{src}"), size=24, quiet=True, workers=1, labels=csv_path)
        meta, recs = read_plain(tmp_path / f"o_{src}")
        assert {os.path.basename(r["source"]): meta["classes"][r["label"]] for r in recs} == \
            {n: w for n, w, _ in vals}


def test_a_v7_tar_without_magic_is_detected(tmp_path, rng):
    with tarfile.open(tmp_path / "a.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        il.add_bytes(tf, "c/x.jpg", encode(random_rgb(rng, 30, 30)))
    data = bytearray((tmp_path / "a.tar").read_bytes())
    data[257:265] = bytes(8)  # no magic, no version: V7
    data[148:156] = b"        "
    data[148:156] = b"%06o\0 " % sum(data[:512])
    (tmp_path / "v7.tar").write_bytes(bytes(data))
    build(str(tmp_path / "v7.tar"), str(tmp_path / "o"), size=24, quiet=True, workers=1)
    assert [r["source"] for r in read_plain(tmp_path / "o")[1]] == ["c/x.jpg"]


def test_gzip_padding_and_a_highly_compressed_member(tmp_path, rng):
    """Zeros after the gzip stream (tape padding) are ignored, as gzip -t does; a member of a megabytes of
    zeros decompresses in bounded pieces."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        il.add_bytes(tf, "c/x.jpg", encode(random_rgb(rng, 30, 30)))
        il.add_bytes(tf, "c/zeros.bin", bytes(40 << 20))
        il.add_bytes(tf, "c/y.jpg", encode(random_rgb(rng, 30, 30)))
    (tmp_path / "a.tgz").write_bytes(gzip.compress(buf.getvalue()) + bytes(4096))
    build(str(tmp_path / "a.tgz"), str(tmp_path / "o"), size=24, quiet=True, workers=1)
    assert sorted(r["source"] for r in read_plain(tmp_path / "o")[1]) == ["c/x.jpg", "c/y.jpg"]


def _with_size_field(block, field):
    """A 512-byte tar header with its 12-byte size field replaced, checksum recomputed."""
    h = bytearray(block[:512])
    h[124:136] = field
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _base256(n):
    return bytes([0x80 if n >= 0 else 0xFF]) + (n % (1 << 88)).to_bytes(11, "big")


@pytest.mark.parametrize("claim", ["pax 10**15", "base-256 2**62", "base-256 2**63-1", "base-256 negative",
                                   "long name 6 GiB"])
def test_tar_headers_that_claim_huge_sizes_allocate_nothing_of_it(tmp_path, rng, claim):
    """A header claiming far more than the archive (or a negative size) is skipped or reported, never read or
    allocated: the build runs under a 1.5 GB address-space limit and packs the honest members."""
    good = encode(random_rgb(rng, 40, 50))
    honest = tarfile.TarInfo("c0/good.jpg")
    honest.size = len(good)
    with open(tmp_path / "a.tar", "wb") as f:
        f.write(honest.tobuf(tarfile.GNU_FORMAT) + good + bytes(-len(good) % 512))
        bad = tarfile.TarInfo("c1/bad.jpg")
        bad.size = len(good)
        if claim == "pax 10**15":
            bad.pax_headers = {"size": str(10**15)}
            f.write(bad.tobuf(tarfile.PAX_FORMAT) + good + bytes(-len(good) % 512))
        elif claim == "long name 6 GiB":
            long = tarfile.TarInfo("././@LongLink")
            long.type, long.size = tarfile.GNUTYPE_LONGNAME, 6 << 30
            f.write(long.tobuf(tarfile.GNU_FORMAT) + b"c1/long.jpg\0" + bytes(500))
        else:
            size = {"base-256 2**62": 2**62, "base-256 2**63-1": 2**63 - 1}.get(claim, -4096)  # the last: Hypothesis
            f.write(_with_size_field(bad.tobuf(tarfile.GNU_FORMAT), _base256(size)) + good + bytes(-len(good) % 512))
        f.write(bytes(1024))
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29)); "
            "from preprocess.build_lmdb import main; import sys; "
            f"sys.exit(main([{str(tmp_path / 'a.tar')!r}, {str(tmp_path / 'out')!r}, '--size', '24', '--workers', '1']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta, recs = read_plain(tmp_path / "out")
    assert [r["source"] for r in recs] == ["c0/good.jpg"]
    assert meta["skipped"], "what the bad header claimed is reported"


def test_a_class_tar_added_twice_packs_its_later_copy(train, tmp_path):
    """`tar -rf train.tar n01.tar` after an update: the class tar is in the archive twice. Its images are packed
    once, from the later copy, as tar would extract them (it was refused as 'a class tar that holds no images')."""
    tmp, images = train
    first = sorted(images)[0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as inner:
        for name in sorted(images[first]):
            il.add_bytes(inner, name, images[first][name])
    data = (tmp / "train.tar").read_bytes()
    with tarfile.open(tmp_path / "twice.tar", "w") as outer:  # the same archive, that class tar appended again
        with tarfile.open(tmp / "train.tar") as src:
            for m in src:
                outer.addfile(m, src.extractfile(m))
        il.add_bytes(outer, f"{first}.tar", buf.getvalue())
    assert len(data) < (tmp_path / "twice.tar").stat().st_size
    build(str(tmp_path / "twice.tar"), str(tmp_path / "out"), size=32, quiet=True, workers=1)
    build(str(tmp / "train.tar"), str(tmp_path / "once"), size=32, quiet=True, workers=1)
    assert read_plain(tmp_path / "out")[1] == read_plain(tmp_path / "once")[1]


def test_a_gnu_sparse_member_is_no_cut_short_archive(tmp_path, rng):
    """GNU tar -S stores a sparse file's chunks only: the archive is whole (it was reported 'cut short', and
    refused under --strict); the sparse member is skipped by name, the images beside it packed."""
    import shutil
    if shutil.which("tar") is None:
        pytest.skip("no tar here")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jpg").write_bytes(encode(random_rgb(rng, 30, 40)))
    with open(tmp_path / "c" / "holes.jpg", "wb") as f:
        f.truncate(1 << 20)
        f.seek(500_000)
        f.write(b"xyz")
    subprocess.run(["tar", "-S", "-cf", str(tmp_path / "s.tar"), "-C", str(tmp_path), "c"], check=True)
    proc = run_cli("preprocess.build_lmdb", tmp_path / "s.tar", tmp_path / "out", "--size", 24)
    meta, recs = read_plain(tmp_path / "out")
    assert [r["source"] for r in recs] == ["c/a.jpg"] and "cut short" not in proc.stderr
    assert [(s["source"], "sparse" in s["reason"]) for s in meta["skipped"]] == [("c/holes.jpg", True)]
    strict = run_cli("preprocess.build_lmdb", tmp_path / "s.tar", tmp_path / "o2", "--size", 24, "--strict",
                     check=False)
    assert strict.returncode == 2 and "c/holes.jpg" in strict.stderr and "cut short" not in strict.stderr
