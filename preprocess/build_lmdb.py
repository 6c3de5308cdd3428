"""Pack one split into LMDB shards: ``python -m preprocess.build_lmdb SRC OUT [options]``.

Each image is decoded, rescaled so its shorter side is ``--size`` and centre-cropped to a square (paper
Sec. 2), encoded, and written as one record (``datasets/format.py``, ``docs/FORMAT.md``). The pixel
statistics for mean subtraction and the PCA colour shift come out of the same pass.

The build runs in ``OUT.partial`` beside OUT and is renamed to OUT only when complete, so OUT never looks
complete unless it is. Progress is committed every few seconds; ``--resume`` continues an interrupted
build and yields the same records as an uninterrupted one.
"""
import argparse
import errno
import glob
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import cv2
import lmdb
import msgpack
import numpy as np
from tqdm import tqdm
from zlib_ng import zlib_ng

from datasets import cli, format as fmt
from datasets.lock import FolderLock, LockedError
from preprocess import image_ops
from preprocess.imagenet_labels import read_class_names
from preprocess.sources import FORMATS, MissingFile, Part, SourceError, inside, open_source
from preprocess.tar_source import is_gzip, looks_like_tar
from preprocess.stats import PixelStats

PLAN_FILE = "plan.json"
IMAGE_SUM_FILE = "image_sum.npy"  # a part's exact per-pixel sums (int64), so merged parts' mean image is exact
PROGRESS_FILE = "progress.msgpack"
SHARD_BYTES = 1 << 30
CHUNK = 32  # images per task handed to a worker
COMMIT_SECONDS = 2.0
EST_BYTES_PER_PIXEL = {"jpeg": 0.5, "png": 2.0, "raw": 3.0}  # for the default shard count


class BuildError(Exception):
    """A build that cannot go on; the message names the file, record or option and what to do."""


@dataclass(frozen=True)
class Options:
    """What a worker needs to turn an input into a record."""
    size: int = 256
    encoding: str = "jpeg"
    quality: int = 90
    exact: bool = False
    max_pixels: int = 178_956_970
    mean_image: bool = False


def to_record_image(data, opts):
    """One input (file bytes, an RGB array, or a MissingFile) -> the size×size BGR square."""
    if isinstance(data, MissingFile):
        raise image_ops.SkipImage(*data.args)
    if isinstance(data, np.ndarray):
        bgr = cv2.cvtColor(data, cv2.COLOR_RGB2BGR)
    else:
        bgr = image_ops.decode(data, size=opts.size, exact=opts.exact, max_pixels=opts.max_pixels)
    return image_ops.to_square(bgr, opts.size, exact=opts.exact)


_worker = {}


def _init_worker(source, opts):
    _worker.update(source=source, opts=opts)


def _process_chunk(indices):
    """Records (or skip reasons) for a list of input indices, and the chunk's pixel statistics."""
    source, opts = _worker["source"], _worker["opts"]
    size = opts.size
    stats = PixelStats((size, size, 3) if opts.mean_image else None)
    out = []
    for i, data in zip(indices, source.load(indices)):
        try:
            square = to_record_image(data, opts)
        except image_ops.SkipImage as skip:
            out.append((None, {"source": source.name(i), "reason": str(skip)}))
            continue
        stats.add(square)
        image = fmt.encode_image(square, opts.encoding, opts.quality, bgr=True)
        out.append((fmt.pack_record(image, source.label(i), square.shape, source.name(i)), None))
    return out, stats.to_dict(with_image=True)


def _put_all(env, start, values):
    """Write records with consecutive keys from ``start`` in one transaction, growing the map if full."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for k, v in enumerate(values, start):
                    if not txn.put(fmt.encode_key(k), v, append=True):
                        raise BuildError(f"record {k} already exists in {env.path()}")
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


class _Writer:
    """Writes records to the shards in order and keeps ``progress.msgpack`` in step with LMDB commits."""

    def __init__(self, tmp, map_size, commit_every, progress):
        self.tmp, self.map_size, self.commit_every = tmp, map_size, commit_every
        self.shards = [PixelStats.from_dict(s) for s in progress["shards"]]
        self.counts = list(progress["counts"])
        self.total = PixelStats.from_dict(progress["total"])
        self.skipped = list(progress["skipped"])
        self.position = progress["position"]
        self.env, self.shard, self.pending, self.last_commit = None, None, [], time.monotonic()

    def _open(self, s):
        self.commit()
        if self.env is not None:
            self.env.close()
        while len(self.counts) <= s:
            self.counts.append(0)
            self.shards.append(PixelStats())
        self.shard = s
        self.env = fmt.open_shard(os.path.join(self.tmp, fmt.shard_name(s)), write=True, map_size=self.map_size)

    def add(self, shard, n_inputs, results, stats, strict):
        if shard != self.shard:
            self._open(shard)
        for value, skip in results:
            if skip is not None:
                if strict:
                    raise BuildError(f"{skip['source']}: {skip['reason']} (--strict makes any skip an error; "
                                     "fix or remove the file, then run again with --resume)")
                self.skipped.append(skip)
            else:
                self.pending.append(value)
        chunk = PixelStats.from_dict(stats)
        self.total.merge(chunk)
        self.shards[shard].merge(chunk)  # shard sums keep no mean image: merge skips it
        self.position += n_inputs
        if len(self.pending) >= self.commit_every or time.monotonic() - self.last_commit > COMMIT_SECONDS:
            self.commit()

    def commit(self):
        """LMDB first, then the progress file: a kill between the two leaves extra records, which
        ``--resume`` deletes, never missing ones."""
        if self.env is None:
            return
        start = sum(self.counts)
        _put_all(self.env, start, self.pending)
        self.counts[self.shard] += len(self.pending)
        self.pending = []
        progress = {"position": self.position, "counts": self.counts, "skipped": self.skipped,
                    "shards": [s.to_dict() for s in self.shards], "total": self.total.to_dict(with_image=True)}
        with fmt.atomic_path(os.path.join(self.tmp, PROGRESS_FILE)) as tmp, open(tmp, "wb") as f:
            f.write(msgpack.packb(progress))
        self.last_commit = time.monotonic()

    def close(self):
        self.commit()
        if self.env is not None:
            self.env.close()
            self.env = None


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_plan(tmp, plan):
    """The saved plan of an interrupted build, checked against this one; the progress to resume from."""
    try:
        with open(os.path.join(tmp, PLAN_FILE), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise BuildError(f"{tmp}: cannot resume, its {PLAN_FILE} is unreadable ({exc}); "
                         "start over with --overwrite") from None
    for key in plan["params"]:
        if saved["params"].get(key) != plan["params"][key]:
            raise BuildError(f"{tmp}: cannot resume, option {key!r} was {saved['params'].get(key)!r} and is now "
                             f"{plan['params'][key]!r}; use the same options, or start over with --overwrite")
    if saved["digest"] != plan["digest"]:
        raise BuildError(f"{tmp}: cannot resume, the input list changed since the build started "
                         "(files added, removed or relabelled); start over with --overwrite")
    return _read_progress(os.path.join(tmp, PROGRESS_FILE))


def _read_progress(path):
    """The saved progress, or None where there is none to trust: not written yet (a build killed before its
    first progress write, perhaps after its first LMDB commit) or damaged; the build then restarts from its
    first input, and ``_truncate`` drops whatever records the shards hold."""
    try:
        with open(path, "rb") as f:
            progress = msgpack.unpackb(f.read())
        ok = (isinstance(progress, dict) and isinstance(progress.get("position"), int) and progress["position"] >= 0
              and isinstance(progress.get("counts"), list) and isinstance(progress.get("skipped"), list)
              and all(isinstance(c, int) and c >= 0 for c in progress["counts"])
              and isinstance(progress.get("shards"), list) and len(progress["shards"]) == len(progress["counts"]))
        if ok:
            [PixelStats.from_dict(s) for s in progress["shards"]]
            PixelStats.from_dict(progress["total"])
    except FileNotFoundError:
        return None
    except Exception as exc:  # unreadable, not msgpack, or fields that do not hold together
        ok, why = False, f"{type(exc).__name__}: {exc}"
    else:
        why = "its fields do not hold together"
    if not ok:
        print(f"warning: {path} is damaged ({why}); the build restarts from its first input", file=sys.stderr)
        return None
    return progress


def _truncate(tmp, progress):
    """Drop what an interrupted build wrote after its last saved progress."""
    last = len(progress["counts"]) - 1
    for name in sorted(os.listdir(tmp)):
        if name.startswith("shard-") and int(name[6:]) > last:
            shutil.rmtree(os.path.join(tmp, name))
    if last >= 0:
        keep = sum(progress["counts"])
        env = fmt.open_shard(os.path.join(tmp, fmt.shard_name(last)), write=True)
        with env.begin(write=True) as txn:
            cur = txn.cursor()
            while cur.set_range(fmt.encode_key(keep)):
                cur.delete()
        env.close()


def _check_apart(src, out, tmp):
    """OUT (and OUT.partial) and SRC must not contain one another: a rebuild would delete its own input."""
    rs, ro, rt = os.path.realpath(src), os.path.realpath(out), os.path.realpath(tmp)
    if ro == rs:
        raise BuildError(f"OUT {ro} is SRC {rs}: the build would replace its own input; choose an OUT elsewhere")
    for o in (ro, rt):
        if os.path.isdir(rs) and inside(o, rs):
            raise BuildError(f"OUT {ro} is inside SRC {rs}: choose an OUT outside the images")
        if inside(rs, o):
            raise BuildError(f"SRC {rs} is inside OUT {ro}: a rebuild would delete it; choose another OUT")


def _existing(path):
    """What is at OUT now: None (nothing), 'empty' (an empty folder), 'split' (a packed split), or a phrase
    saying why it is neither."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        return "exists and is not a folder"
    if not os.listdir(path):
        return "empty"
    try:
        fmt.read_meta(path)
    except fmt.FormatError:
        return "exists and is not a packed split (no meta.json of format alexnet-lmdb)"
    return "split"


def _publish(tmp, out, lock, overwrite):
    """Rename the finished OUT.partial to OUT, replacing only what the user allowed: OUT is checked again
    here, since anything may have appeared there during the build."""
    kind = _existing(out)
    if kind not in (None, "empty", "split") or (kind == "split" and not overwrite):
        raise BuildError(f"{out} {kind if kind != 'split' else 'became a packed split'} while this build ran; "
                         f"the finished build stays in {tmp}: move {out} away, then run the same command with "
                         "--resume to publish it")
    old = None
    if kind is not None:
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)  # the lock file goes along, still held: no second build can start on a half-moved OUT
    lock.published(out)
    _fsync_dir(os.path.dirname(out))
    # this one's, and what a publish killed between its two renames (or before removing it) left: only a
    # publish moves OUT aside, and only while it holds OUT's lock, as this one does
    for stale in sorted(glob.glob(glob.escape(f"{out}.old-") + "[0-9]*")):
        if os.path.islink(stale) or not os.path.isdir(stale):
            os.remove(stale)
        else:
            shutil.rmtree(stale)
        if stale != old:
            print(f"removed {stale}, the split an interrupted publish had replaced", file=sys.stderr)


def _write_error(tmp, exc, done=0, total=0):
    """A BuildError for a failed write: 'no space left' when that is what happened, with the bytes still
    needed (estimated from the ``done`` of ``total`` inputs written so far), and how to go on."""
    free = shutil.disk_usage(tmp).free if os.path.isdir(tmp) else None
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or (free is not None and
                                                                                     free < (64 << 20)):
        used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
        need = f"; about {used / done * (total - done) / 2**20:.0f} MiB more are needed" if 0 < done < total else ""
        return BuildError(f"{tmp}: no space left on the device ({free} bytes free{need}; {exc}); free some space, "
                          "then run the same command with --resume")
    return BuildError(f"{tmp}: writing failed ({exc}); fix the cause, then run the same command with --resume")


class BuildLock(FolderLock):
    """OUT.partial's lock (``datasets/lock.py``): one build per OUT at a time."""

    def __init__(self, tmp, out):
        try:
            super().__init__(tmp, lambda pid: f"another build (pid {pid}) is writing {out}; wait for it to finish, "
                                              "or stop it first")
        except LockedError as exc:
            raise BuildError(str(exc)) from None
        self.tmp = tmp

    def others(self):
        """What OUT.partial holds besides the lock: an interrupted build, or nothing."""
        return [n for n in os.listdir(self.tmp) if n != self.name]

    def clear(self):
        for name in self.others():
            p = os.path.join(self.tmp, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)

    def published(self, out):
        """OUT.partial became OUT: drop the lock file from the split (the lock itself is held until release)."""
        os.remove(os.path.join(out, self.name))


def record_order(n, seed, shuffle):
    """Which input each record position holds: a seeded permutation (a sequential read then mixes classes),
    or the input order with ``shuffle=False``; parts take consecutive runs of it (``sources.Part``)."""
    return np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)


def decompressed(src, out, quiet):
    """A gzip-compressed tar, decompressed once beside OUT, since reading images in place needs random access
    (kept for --resume, removed once the build is complete). An archive cut short keeps what it holds: its
    listing then reports the truncation, as for a plain tar."""
    st = os.stat(src)
    key = hashlib.sha1(repr((os.path.abspath(src), st.st_size, st.st_mtime_ns)).encode()).hexdigest()[:12]
    path = f"{out}.source-{key}.tar"
    for stale in glob.glob(glob.escape(f"{out}.source-") + "*.tar"):  # this build holds OUT's lock: none is in use
        if stale != path:
            os.remove(stale)
            print(f"removed {stale}, left by a build that was stopped or that read another archive",
                  file=sys.stderr)
    if os.path.exists(path):
        print(f"{src}: reusing its decompressed copy {path}", file=sys.stderr)
        return path
    with open(src, "rb") as f:
        try:
            head = zlib_ng.decompressobj(wbits=31).decompress(f.read(1 << 16), 512)
        except zlib_ng.error as exc:
            raise BuildError(f"{src}: not a readable gzip file ({exc})") from None
    if not looks_like_tar(head[:512]):
        raise BuildError(f"{src}: gzip-compressed, but not a tar archive; unpack it first (gunzip -k)")
    print(f"{src} is gzip-compressed: decompressing it once to {path} (about the size of the archive, since JPEGs "
          "do not compress; removed when the build is complete)", file=sys.stderr)
    try:
        with fmt.atomic_path(path) as part, open(src, "rb") as raw, open(part, "wb") as f, \
                tqdm(total=st.st_size, unit="B", unit_scale=True, disable=quiet, file=sys.stderr,
                     desc="decompressing") as bar:
            gz = zlib_ng.decompressobj(wbits=31)
            while chunk := raw.read(1 << 20):
                bar.update(len(chunk))
                while chunk:
                    if gz.eof:  # another gzip member (cat a.gz b.gz), or zeros padding the file: ignored
                        if not chunk.strip(b"\0"):
                            break
                        gz = zlib_ng.decompressobj(wbits=31)
                    f.write(gz.decompress(chunk, 1 << 24))  # bounded: 1 MiB of zeros may hold 1 GiB
                    chunk = gz.unused_data if gz.eof else gz.unconsumed_tail
            while not gz.eof and (more := gz.decompress(gz.unconsumed_tail, 1 << 24)):
                f.write(more)
            if not gz.eof:  # what came before the cut is kept, and its listing reports the truncation
                f.write(gz.flush())
                print(f"warning: {src}: the gzip stream ends early: the archive was cut short", file=sys.stderr)
    except zlib_ng.error as exc:
        raise BuildError(f"{src}: not a readable gzip file ({exc})") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise BuildError(f"{path}: no space left on the device to decompress {src} (it needs about "
                             f"{st.st_size / 2**20:.0f} MiB or more); free some space, or decompress it elsewhere "
                             "(gunzip -k) and pass the .tar") from None
        raise
    return path


def default_workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build(src, out, *, format=None, root=None, split="train", h5_images="images", h5_labels="labels",
          size=256, encoding="jpeg", quality=90, shards=None, workers=None, seed=0, shuffle=True,
          exact=False, mean_image=False, classes_from=None, strict=False, max_pixels=178_956_970,
          resume=False, overwrite=False, quiet=False, commit_every=2048, map_size=None, allow_outside_root=False,
          labels=None, class_names=None, part=None, parts=None):
    """Build the split OUT from SRC (with ``parts``, only its ``part``-th share: ``sources.Part``); returns
    the summary (also printed unless ``quiet``)."""
    t0 = time.monotonic()
    out = os.path.abspath(out.rstrip("/"))
    tmp = out + ".partial"
    _check_apart(src, out, tmp)
    if encoding not in fmt.ENCODINGS:
        raise BuildError(f"--encoding {encoding!r}: one of {', '.join(fmt.ENCODINGS)}")
    for name, value in (("--size", size), ("--shards", shards), ("--workers", workers),
                        ("--commit-every", commit_every), ("--max-pixels", max_pixels)):
        if value is not None and value < 1:
            raise BuildError(f"{name} {value}: must be at least 1")
    if not 1 <= quality <= 100:
        raise BuildError(f"--quality {quality}: must be in 1..100")
    if (part is None) != (parts is None):
        raise BuildError("--part I and --parts K go together (the I-th of K shares, I from 0)")
    if parts is not None and not 0 <= part < parts:
        raise BuildError(f"--part {part}: must be in 0..{parts - 1} for --parts {parts}")
    out_kind = _existing(out)
    if out_kind == "split" and resume and not os.path.lexists(tmp):
        meta = fmt.read_meta(out)
        if not quiet:
            print(f"{out} is complete ({meta['num_records']} records); nothing to resume", file=sys.stderr)
        return {"out": out, "written": 0, "skipped": {}, "bytes": 0, "images_per_s": 0.0, "elapsed_s": 0.0}
    if out_kind == "split" and not overwrite:
        raise BuildError(f"{out} already exists; pass --overwrite to replace it")
    if out_kind not in (None, "empty", "split"):
        raise BuildError(f"{out} {out_kind}; --overwrite only ever replaces a packed split: choose another OUT, "
                         "or move it away yourself")
    if os.path.lexists(tmp) and not os.path.isdir(tmp):
        raise BuildError(f"{tmp} exists and is not a folder; the build writes there: move it away")
    classes, names = None, {}
    if classes_from is not None:
        try:
            other = fmt.read_meta(classes_from)
        except fmt.FormatError as exc:
            raise BuildError(f"--classes-from: {exc}") from None
        classes = other["classes"]
        names = dict(zip(classes, other.get("class_names") or []))
    for option, path in (("--labels", labels), ("--class-names", class_names)):
        if path is not None and not os.path.isfile(path):
            raise BuildError(f"{option} {path}: no such file")
    gz = format in (None, "tar") and os.path.isfile(src) and is_gzip(src)
    lock = BuildLock(tmp, out) if gz else None  # decompressing is part of the build: one at a time
    try:
        read_from = decompressed(src, out, quiet) if gz else src
        source = open_source(read_from, fmt=format, root=root, split=split, h5_images=h5_images,
                             h5_labels=h5_labels, classes=classes, allow_outside_root=allow_outside_root,
                             labels=labels, workers=workers or default_workers(), quiet=quiet, shown=src)
        names.update(getattr(source, "class_names", None) or {})
        if class_names is not None:
            names.update(read_class_names(class_names))
        named = [names.get(c) for c in source.classes]
        if names and None in named:
            example = source.classes[named.index(None)]
            source.warnings.append({"source": class_names or labels or classes_from, "reason": f"no name for "
                                    f"{named.count(None)} of {len(named)} classes (e.g. {example}); they are "
                                    "named by their class"})
        for w in source.warnings:  # even with --quiet: they are problems in the input
            print(f"warning: {w['source']}: {w['reason']}", file=sys.stderr)
        for k, skip in enumerate(source.skipped[:5]):  # found while listing: damage, links not followed, ...
            more = f" (and {len(source.skipped) - 5} more: meta.json's skipped)" if k == 4 < len(source.skipped) - 5 else ""
            print(f"skipped: {skip['source']}: {skip['reason']}{more}", file=sys.stderr)
        if strict and source.skipped:
            first = source.skipped[0]
            raise BuildError(f"{first['source']}: {first['reason']} (--strict makes any skip an error; "
                             f"{len(source.skipped)} found while listing SRC)")
        if parts is not None:
            if len(source) < parts:
                raise BuildError(f"--parts {parts}: SRC has only {len(source)} inputs; use at most that many "
                                 "parts")
            source = Part(source, part, parts, record_order(len(source), seed, shuffle))
        n = len(source)
        opts = Options(size, encoding, quality if encoding == "jpeg" else None, exact, max_pixels, mean_image)
        est = n * size * size * EST_BYTES_PER_PIXEL[encoding]
        num_shards = max(1, min(n, shards or -(-int(est) // SHARD_BYTES)))
        params = {**asdict(opts), "source": os.path.abspath(src), "format": format, "root": root,
                  "split": split, "h5_images": h5_images, "h5_labels": h5_labels, "shards": num_shards,
                  "seed": seed, "shuffle": shuffle, "classes": source.classes, "part": part, "parts": parts,
                  "labels": labels and os.path.abspath(labels),
                  "class_names": [c if m is None else m for c, m in zip(source.classes, named)] if names else None}
        plan = {"params": params, "digest": source.digest(), "num_items": n}

        lock = lock or BuildLock(tmp, out)
        result = _build_locked(source, src, out, tmp, lock, plan, opts, params, resume=resume,
                               overwrite=overwrite, quiet=quiet, strict=strict, workers=workers, seed=seed,
                               shuffle=shuffle, est=est, num_shards=num_shards, map_size=map_size,
                               commit_every=commit_every, t0=t0)
    finally:
        if lock is not None:
            lock.release()
    if gz:
        os.remove(read_from)
    return result


def _build_locked(source, src, out, tmp, lock, plan, opts, params, *, resume, overwrite, quiet, strict, workers,
                  seed, shuffle, est, num_shards, map_size, commit_every, t0):
    """The build proper, once this process holds OUT.partial's lock."""
    n, size, mean_image, encoding = len(source), opts.size, opts.mean_image, opts.encoding
    progress = None
    leftover = lock.others()
    if resume and fmt.META_FILE in leftover and PLAN_FILE not in leftover:
        # finished, then stopped before it was renamed to OUT (killed, or OUT appeared meanwhile)
        fmt.read_meta(tmp)
        _publish(tmp, out, lock, overwrite)
        if not quiet:
            print(f"{out}: the finished build in {tmp} is published", file=sys.stderr)
        return {"out": out, "written": 0, "skipped": {}, "bytes": 0, "images_per_s": 0.0,
                "elapsed_s": time.monotonic() - t0}
    if leftover and not (resume or overwrite):
        raise BuildError(f"{tmp} holds an interrupted build; pass --resume to continue it, "
                         "or --overwrite to start over")
    if leftover and resume:
        progress = _load_plan(tmp, plan)
    else:
        if leftover and not os.path.exists(os.path.join(tmp, PLAN_FILE)):
            raise BuildError(f"{tmp} holds files that are not a build ({', '.join(sorted(leftover)[:3])}); "
                             "--overwrite only discards an interrupted build: move it away yourself")
        lock.clear()
        fmt.write_json_atomic(os.path.join(tmp, PLAN_FILE), plan)
    if progress is None:
        progress = {"position": 0, "counts": [], "skipped": list(source.skipped), "shards": [],
                    "total": PixelStats((size, size, 3) if mean_image else None).to_dict(with_image=True)}
    if resume and leftover:  # every resume the same way: drop what was written after the last saved progress (all, if none)
        _truncate(tmp, progress)
        if not quiet:
            print(f"resuming {tmp} at input {progress['position']} of {n}", file=sys.stderr)

    order = np.arange(n) if isinstance(source, Part) else record_order(n, seed, shuffle)
    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    tasks = [(s, order[a:min(a + CHUNK, bounds[s + 1])].tolist())
             for s in range(num_shards)
             for a in range(max(bounds[s], progress["position"]), bounds[s + 1], CHUNK)]
    shard_map = map_size or int(est / num_shards * 1.5) + (16 << 20)
    writer = _Writer(tmp, shard_map, commit_every, progress)
    workers = workers or default_workers()
    bar = tqdm(total=n, initial=progress["position"], unit="img", disable=quiet, file=sys.stderr,
               smoothing=0.05, dynamic_ncols=True)
    pool, start = None, progress["position"]
    # One core per worker: parallelism comes from processes. Setting OpenCV to one thread before the fork
    # also stops its thread pool, which a forked child must not inherit (it hangs once OpenMP, e.g. torch's,
    # has run in the parent); the caller's setting comes back at the end.
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (source, opts))
            results = pool.imap(_process_chunk, [idx for _, idx in tasks])
        else:
            _init_worker(source, opts)
            results = map(_process_chunk, [idx for _, idx in tasks])
        for (s, idx), (records, stats) in zip(tasks, results):
            writer.add(s, len(idx), records, stats, strict)
            bar.update(len(idx))
        writer.close()
    except (lmdb.Error, OSError) as exc:
        raise _write_error(tmp, exc, writer.position, n) from None
    finally:
        cv2.setNumThreads(cv_threads)
        bar.close()
        if pool is not None:
            pool.terminate()
        writer.env and writer.env.close()

    num_records = sum(writer.counts)
    if num_records == 0 and not isinstance(source, Part):  # a part may be empty: the merge still needs it
        raise BuildError(f"{src}: no image could be packed ({len(writer.skipped)} skipped); see {tmp}")
    summary = writer.total.summary() if num_records else {
        "mean_rgb": [0.0] * 3, "std_rgb": [0.0] * 3, "pca_eigval": [0.0] * 3, "pca_eigvec": np.eye(3).tolist()}
    meta = {
        "format": fmt.FORMAT, "version": fmt.VERSION, "num_records": num_records, "classes": source.classes,
        **({"class_names": params["class_names"]} if params["class_names"] else {}),
        "size": size, "encoding": encoding, "quality": opts.quality, **summary,
        "shards": [{"path": fmt.shard_name(s), "num_records": c, "first_key": sum(writer.counts[:s]),
                    "stats": st.to_dict()} for s, (c, st) in enumerate(zip(writer.counts, writer.shards))],
        "skipped": writer.skipped,
        "warnings": source.warnings,
        "mean_image": fmt.MEAN_IMAGE_FILE if mean_image else None,
        "stats": writer.total.to_dict(),
        **({"part": source.describe() | {"image_sum": IMAGE_SUM_FILE if mean_image else None}}
           if isinstance(source, Part) else {}),
        "build": {k: v for k, v in params.items() if k not in ("classes", "class_names")} | {
            "workers": workers, "elapsed_s": round(time.monotonic() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
                     "lmdb": lmdb.__version__, "msgpack": ".".join(map(str, msgpack.version))},
    }
    try:
        if mean_image:
            with fmt.atomic_path(os.path.join(tmp, fmt.MEAN_IMAGE_FILE)) as path, open(path, "wb") as f:
                np.save(f, writer.total.mean_image(), allow_pickle=False)
            if isinstance(source, Part):
                with fmt.atomic_path(os.path.join(tmp, IMAGE_SUM_FILE)) as path, open(path, "wb") as f:
                    np.save(f, writer.total.image_sum, allow_pickle=False)
        fmt.write_json_atomic(os.path.join(tmp, fmt.META_FILE), meta)
    except OSError as exc:
        raise _write_error(tmp, exc) from None
    for name in (PLAN_FILE, PROGRESS_FILE):
        os.remove(os.path.join(tmp, name))
    _fsync_dir(tmp)
    _publish(tmp, out, lock, overwrite)

    elapsed = time.monotonic() - t0
    reasons = {}
    for s in writer.skipped:
        key = s["reason"].split(":", 1)[0]
        reasons[key] = reasons.get(key, 0) + 1
    nbytes = sum(os.path.getsize(os.path.join(out, sh["path"], "data.mdb")) for sh in meta["shards"])
    result = {"out": out, "written": num_records, "skipped": reasons, "bytes": nbytes,
              "images_per_s": (n - start) / elapsed, "elapsed_s": elapsed}
    if not quiet:
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(reasons.items())) or "none"
        print(f"{out}: {num_records} records in {len(meta['shards'])} shard(s), {nbytes / 2**20:.1f} MiB; "
              f"skipped {len(writer.skipped)} ({skipped}); {result['images_per_s']:.0f} images/s, "
              f"{elapsed:.1f} s")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m preprocess.build_lmdb", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="ImageFolder directory, flat image folder with --labels, list file, HDF5 file, CIFAR "
                               "binary directory, or a tar of any of the image kinds (ILSVRC2012_img_train.tar)")
    p.add_argument("out", help="output split directory (created; only a packed split is ever replaced, and only "
                               "with --overwrite)")
    g = p.add_argument_group("source")
    g.add_argument("--format", choices=FORMATS, help="force the source format instead of detecting it")
    g.add_argument("--root", help="list files: directory the listed paths are relative to (default: the list "
                                  "file's directory); tars: the folder inside the archive to read")
    g.add_argument("--split", choices=("train", "test"), default="train", help="CIFAR: which files to pack")
    g.add_argument("--h5-images", default="images", help="HDF5: the N×H×W×3 uint8 RGB dataset")
    g.add_argument("--h5-labels", default="labels", help="HDF5: the N integer labels dataset")
    g.add_argument("--allow-outside-root", action="store_true", help="list files: accept paths that leave --root "
                                                                    "(refused by default)")
    g.add_argument("--classes-from", metavar="OTHER_OUT", help="use the class list of an already packed split "
                                                             "(val takes train's label indices)")
    g.add_argument("--labels", metavar="FILE", help="labels of a flat folder or tar of images: Kaggle's "
                                                    "LOC_val_solution.csv, or the devkit's "
                                                    "ILSVRC2012_validation_ground_truth.txt with meta.mat beside it")
    g.add_argument("--class-names", metavar="FILE", help="human-readable class names for meta.json: "
                                                         "LOC_synset_mapping.txt or the devkit's meta.mat")
    g = p.add_argument_group("images")
    g.add_argument("--size", type=int, default=256, help="shorter side, then centre crop, in pixels")
    g.add_argument("--exact", action="store_true", help="full decode and area resampling; no DCT-domain "
                                                        "reduction, no linear shrink (slower)")
    g.add_argument("--max-pixels", type=int, default=178_956_970, help="skip images with more pixels")
    g.add_argument("--strict", action="store_true", help="any skipped input is an error")
    g = p.add_argument_group("storage")
    g.add_argument("--encoding", choices=fmt.ENCODINGS, default="jpeg")
    g.add_argument("--quality", type=int, default=90, help="JPEG quality")
    g.add_argument("--shards", type=int, help="number of LMDB environments (default: about 1 GB each)")
    g.add_argument("--seed", type=int, default=0, help="seed of the record order")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the input order")
    g.add_argument("--mean-image", action="store_true", help="also store the per-pixel mean image")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, help="processes (default: all cores)")
    g.add_argument("--part", type=int, help="build only the I-th share (from 0) of --parts K into OUT, for "
                                            "preprocess.merge (default with --parts: the Slurm array task, "
                                            "or a Kubernetes indexed Job's JOB_COMPLETION_INDEX)")
    g.add_argument("--parts", type=int, nargs="?", const="env", help="how many shares SRC is split into (given without "
                                                                  "a number: SLURM_ARRAY_TASK_COUNT)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted build of OUT (a finished one: "
                                                         "nothing to do)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing packed split OUT (or discard an "
                                                            "interrupted build in OUT.partial)")
    g.add_argument("--commit-every", type=int, default=2048, help="records per LMDB transaction (at most "
                                                                   f"{COMMIT_SECONDS:g} s apart); what --resume may redo")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p.parse_args(argv)


def part_from_env(part, parts, env=os.environ):
    """``--part``/``--parts``, defaulting to the Slurm array (task IDs need not start at 0, and may step) or a
    Kubernetes indexed Job; a default that cannot be found or read is an error naming the variable."""
    def number(name):
        try:
            return int(env[name])
        except ValueError:
            raise BuildError(f"{name}={env[name]!r} is not an integer; give --part I --parts K") from None

    if parts == "env":
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise BuildError("--parts without a number takes SLURM_ARRAY_TASK_COUNT, which is not set; give --parts K")
        parts = number("SLURM_ARRAY_TASK_COUNT")
    if parts is not None and part is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            step = number("SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
            first = number("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
            offset = number("SLURM_ARRAY_TASK_ID") - first
            if step < 1 or offset % step:
                raise BuildError(f"SLURM_ARRAY_TASK_ID {env['SLURM_ARRAY_TASK_ID']} is not on the array's steps "
                                 f"(from {first} by {step}); give --part I")
            part = offset // step
        elif "JOB_COMPLETION_INDEX" in env:
            part = number("JOB_COMPLETION_INDEX")
        else:
            raise BuildError(f"--parts {parts} without --part: give --part I, or run it as a Slurm array task "
                             "(SLURM_ARRAY_TASK_ID) or a Kubernetes indexed Job (JOB_COMPLETION_INDEX)")
    return part, parts


def main(argv=None):
    args = vars(parse_args(argv))
    src, out = args.pop("src"), args.pop("out")
    try:
        args["part"], args["parts"] = part_from_env(args["part"], args["parts"])
        build(src, out, **args)
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    cli.run(main, (BuildError, SourceError, fmt.FormatError))
