"""Merge parts built anywhere into one split: ``python -m preprocess.merge OUT PART [PART …]``.

Each PART is a complete split built with ``--part I --parts K`` (``preprocess/build_lmdb.py``). The merge
checks that the parts are the K shares of the same input with the same options, then writes OUT's
meta.json and links each part's shard files into OUT: no image byte is copied (parts on another filesystem
are copied, and the summary says so), so it takes about as long for a terabyte as for a megabyte. A part's
records keep their keys, which version 2 of the format records as each shard's ``first_key``. The
statistics are the sums of the parts' exact integer sums: those of a single-machine build, to the bit.
OUT is written in OUT.partial and renamed when complete, like a build.
"""
import argparse
import errno
import os
import shutil
import sys
import time

import numpy as np

from datasets import cli, format as fmt
from preprocess.build_lmdb import IMAGE_SUM_FILE, BuildError, BuildLock, _check_apart, _existing, _fsync_dir, _publish
from preprocess.stats import PixelStats

MERGE_FILE = "merge.json"  # marks OUT.partial as a merge in progress: a later merge may clear it
SAME = ("size", "encoding", "quality", "classes")  # meta.json fields every part must share
SAME_BUILD = ("exact", "max_pixels", "mean_image", "h5_images", "h5_labels", "seed", "shuffle")  # input: digest


class MergeError(BuildError):
    """Parts that do not make one split; the message names the part and what differs."""


def _read_parts(paths):
    """meta.json of each part, checked to be the K disjoint shares of one input, built the same way; in
    part order."""
    parts = []
    for path in paths:
        try:
            meta = fmt.read_meta(path)
        except fmt.FormatError as exc:
            raise MergeError(f"{path}: not a packed split ({exc})") from None
        if "part" not in meta:
            raise MergeError(f"{path}: a whole split, not a part (build parts with --part I --parts K)")
        _check_part(path, meta)
        for shard in meta["shards"]:  # a part copied from another machine may be incomplete
            try:
                fmt.open_shard(os.path.join(path, shard["path"])).close()
            except fmt.FormatError as exc:
                raise MergeError(f"{exc}; this part cannot be merged") from None
        parts.append((os.path.abspath(path), meta))
    first_path, first = parts[0]
    count = first["part"]["count"]
    by_index = {}
    for path, meta in parts:
        for field in SAME:
            if meta[field] != first[field]:
                raise MergeError(f"{path}: {field} {_show(meta[field])}, but {first_path} has {_show(first[field])}; "
                                 "parts must be built with the same options")
        for key in SAME_BUILD:
            if meta["build"].get(key) != first["build"].get(key):
                raise MergeError(f"{path}: built with {key} {meta['build'].get(key)!r}, but {first_path} with "
                                 f"{first['build'].get(key)!r}; parts must be built with the same options")
        p = meta["part"]
        if p["count"] != count:
            raise MergeError(f"{path}: part {p['index']} of {p['count']}, but {first_path} is one of {count}")
        if p["digest"] != first["part"]["digest"] or p["of"] != first["part"]["of"]:
            raise MergeError(f"{path}: a part of another input than {first_path} (its list of {p['of']} inputs "
                             "differs); build every part from the same SRC")
        if os.path.realpath(path) in {os.path.realpath(q) for q, _ in by_index.values()}:
            raise MergeError(f"{path}: given twice")
        if p["index"] in by_index:
            raise MergeError(f"{path}: part {p['index']} of {count} again (also {by_index[p['index']][0]}); "
                             "give each part once")
        by_index[p["index"]] = (path, meta)
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise MergeError(f"part(s) {', '.join(map(str, missing))} of {count} missing (have "
                         f"{', '.join(map(str, sorted(by_index)))}); build them with --part I --parts {count}, "
                         "then merge all")
    ordered = [by_index[i] for i in range(count)]
    end = 0
    for path, meta in ordered:
        start, stop = meta["part"]["inputs"]
        if start != end:
            raise MergeError(f"{path}: holds inputs {start}..{stop - 1}, expected from {end}; a gap or overlap "
                             "between parts: rebuild it")
        end = stop
    if end != first["part"]["of"]:
        raise MergeError(f"the parts hold inputs 0..{end - 1} of {first['part']['of']}; rebuild the last part")
    return ordered


def _finished_merge(tmp, others):
    """Whether OUT.partial holds a merge that finished but was not published (killed after its marker was
    removed): this merge may clear it and do it again."""
    if fmt.META_FILE not in others:
        return False
    try:
        return "merged" in (fmt.read_meta(tmp).get("build") or {})
    except fmt.FormatError:
        return False


def _check_part(path, meta):
    """The ``part`` field's entries have their types: a part from elsewhere is checked, not trusted."""
    p = meta["part"]
    ok = (isinstance(p, dict) and all(type(p.get(k)) is int and p[k] >= 0 for k in ("index", "count", "of"))
          and p["index"] < p["count"] and isinstance(p.get("digest"), str)
          and isinstance(p.get("inputs"), list) and len(p["inputs"]) == 2
          and all(type(i) is int for i in p["inputs"]) and 0 <= p["inputs"][0] <= p["inputs"][1] <= p["of"]
          and (p.get("image_sum") is None or (isinstance(p["image_sum"], str) and
                                              os.path.basename(p["image_sum"]) == p["image_sum"])))
    if not ok:
        raise MergeError(f"{path}/meta.json: field part is damaged ({_show(p)}); rebuild this part")
    for field, kind in (("skipped", list), ("warnings", list), ("build", dict), ("stats", dict)):
        if not isinstance(meta.get(field, [] if field == "warnings" else None), kind):
            raise MergeError(f"{path}/meta.json: field {field} is {_show(meta.get(field))}, not a {kind.__name__}; "
                             "rebuild this part")
    try:
        stats = [PixelStats.from_dict(x) for x in (meta["stats"], *(s["stats"] for s in meta["shards"]))]
    except Exception as exc:
        raise MergeError(f"{path}/meta.json: its stats are damaged ({type(exc).__name__}: {exc}); rebuild this "
                         "part") from None
    if sum(x.images for x in stats[1:]) != stats[0].images or \
            any(x.images != s["num_records"] for x, s in zip(stats[1:], meta["shards"])):
        raise MergeError(f"{path}/meta.json: its statistics do not count its records; rebuild this part")
    if meta["mean_image"] and not p.get("image_sum"):
        raise MergeError(f"{path}: has a mean image but no {IMAGE_SUM_FILE}; rebuild this part")


def _show(value):
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _link(src, dst):
    """Hard-link ``src`` to ``dst``; copy it if they are on different filesystems. True when linked."""
    try:
        os.link(src, dst)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    shutil.copyfile(src, dst)
    return False


def merge(out, parts, *, overwrite=False, quiet=False):
    """Merge the part splits ``parts`` into the split ``out``; returns a summary."""
    t0 = time.monotonic()
    out = os.path.abspath(out.rstrip("/"))
    tmp = out + ".partial"
    if not parts:
        raise MergeError("no parts given: python -m preprocess.merge OUT PART [PART ...]")
    for p in parts:
        _check_apart(p, out, tmp)
    ordered = _read_parts(parts)
    kind = _existing(out)
    if kind == "split" and not overwrite:
        raise MergeError(f"{out} already exists; pass --overwrite to replace it")
    if kind not in (None, "empty", "split"):
        raise MergeError(f"{out} {kind}; --overwrite only ever replaces a packed split")
    lock = BuildLock(tmp, out)
    try:
        others = lock.others()
        if others and MERGE_FILE not in others and not _finished_merge(tmp, others):
            raise MergeError(f"{tmp} holds an interrupted build or other files ({', '.join(sorted(others)[:3])}); "
                             "move it away, or finish that build")
        lock.clear()
        fmt.write_json_atomic(os.path.join(tmp, MERGE_FILE), {"parts": [p for p, _ in ordered]})
        summary = _merge_locked(out, tmp, lock, ordered, overwrite, t0)
    finally:
        lock.release()
    if not quiet:
        how = "linked" if summary["copied"] == 0 else f"{summary['copied']} copied (parts on another filesystem)"
        print(f"{out}: {summary['records']} records from {len(ordered)} parts, {summary['shards']} shards {how}, "
              f"{summary['elapsed_s']:.2f} s", file=sys.stderr)
    return summary


def _merge_locked(out, tmp, lock, ordered, overwrite, t0):
    first = ordered[0][1]
    total = PixelStats()
    shards, skipped, warnings, copied = [], [], [], 0
    image_sum = None
    for path, meta in ordered:
        total.merge(PixelStats.from_dict(meta["stats"]))
        skipped += meta["skipped"]
        warnings += meta.get("warnings", [])
        for shard, first_key in zip(meta["shards"], fmt.first_keys(meta)):
            if shard["num_records"] == 0:  # a part whose inputs were all skipped
                continue
            name = fmt.shard_name(len(shards))
            src = os.path.join(path, shard["path"], "data.mdb")
            os.mkdir(os.path.join(tmp, name))
            copied += not _link(src, os.path.join(tmp, name, "data.mdb"))
            _check_linked(os.path.join(tmp, name), shard, first_key, os.path.join(path, shard["path"]))
            shards.append({"path": name, "num_records": shard["num_records"], "first_key": first_key,
                           "stats": shard["stats"]})
        if first["mean_image"]:
            sum_path = os.path.join(path, meta["part"]["image_sum"])
            try:
                part_sum = np.load(sum_path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise MergeError(f"{sum_path}: unreadable ({exc}); restore the part or rebuild it") from None
            shape = (first["size"], first["size"], 3)
            if part_sum.shape != shape or part_sum.dtype != np.int64:
                raise MergeError(f"{sum_path}: {part_sum.dtype} {list(part_sum.shape)}, expected int64 "
                                 f"{list(shape)}; rebuild the part")
            image_sum = part_sum if image_sum is None else image_sum + part_sum
    for path, meta in ordered:  # what was linked is what was read: no part was rebuilt meanwhile
        try:
            now = fmt.read_meta(path)
        except fmt.FormatError as exc:
            now = str(exc)
        if now != meta:
            raise MergeError(f"{path}: its meta.json changed during the merge (rebuilt?); merge again once no "
                             "build writes the parts")
    if not shards:
        raise MergeError("the parts hold no records at all (every input was skipped); see their meta.json")
    if sum(s["stats"]["images"] for s in shards) != total.images:
        raise MergeError("the parts' shard statistics do not add up to their totals; a part is damaged: rebuild it")
    meta = {
        "format": fmt.FORMAT, "version": fmt.VERSION, "num_records": sum(s["num_records"] for s in shards),
        "classes": first["classes"],
        **({"class_names": first["class_names"]} if "class_names" in first else {}),
        "size": first["size"], "encoding": first["encoding"], "quality": first["quality"], **total.summary(),
        "shards": shards, "skipped": skipped, "warnings": warnings,
        "mean_image": fmt.MEAN_IMAGE_FILE if image_sum is not None else None,
        "stats": total.to_dict(),
        "build": {key: first["build"].get(key) for key in SAME_BUILD} | {
            "merged": [{"path": p, "part": m["part"]["index"], "inputs": m["part"]["inputs"],
                        "created": m["build"].get("created")} for p, m in ordered],
            "parts": len(ordered), "elapsed_s": round(time.monotonic() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "versions": first["versions"],
    }
    if image_sum is not None:
        total.image_sum = image_sum
        with fmt.atomic_path(os.path.join(tmp, fmt.MEAN_IMAGE_FILE)) as p, open(p, "wb") as f:
            np.save(f, total.mean_image(), allow_pickle=False)
    fmt.write_json_atomic(os.path.join(tmp, fmt.META_FILE), meta)
    os.remove(os.path.join(tmp, MERGE_FILE))
    _fsync_dir(tmp)
    _publish(tmp, out, lock, overwrite)
    return {"out": out, "records": meta["num_records"], "shards": len(shards), "copied": copied,
            "elapsed_s": time.monotonic() - t0}


def _check_linked(shard_dir, shard, first_key, source):
    """The linked shard holds what its part's meta.json says: ``num_records`` records keyed from ``first_key``
    on (a hand-edited or rebuilt part would make a split that ``verify`` refuses)."""
    env = fmt.open_shard(shard_dir)
    try:
        with env.begin() as txn:
            n, cur = txn.stat()["entries"], txn.cursor()
            keys = (fmt.decode_key(cur.key()) if cur.first() else None, fmt.decode_key(cur.key()) if cur.last() else None)
    finally:
        env.close()
    want = (first_key, first_key + shard["num_records"] - 1)
    if n != shard["num_records"] or keys != want:
        raise MergeError(f"{source}: holds {n} records keyed {keys[0]}..{keys[1]}, but its meta.json says "
                         f"{shard['num_records']} from {first_key}; the part is damaged or was rebuilt: rebuild it")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m preprocess.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the merged split (created; an existing split is replaced only with --overwrite)")
    p.add_argument("parts", nargs="+", help="the part splits, built with --part I --parts K, in any order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing packed split OUT")
    p.add_argument("--quiet", action="store_true", help="no summary")
    args = p.parse_args(argv)
    merge(args.out, args.parts, overwrite=args.overwrite, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    cli.run(main, (BuildError, fmt.FormatError))
