"""Images read in place from a tar archive, nothing extracted: ILSVRC-2012's train tar (one inner tar per
class, ``nXXXXXXXX.tar``), its flat val tar, or any tar of ``CLASS/…/image`` paths.

Listing reads only the headers (the inner tars' in parallel); each image is then one ``os.pread`` of its
bytes at their offset in the archive, so workers read any record in any order, from one open file each.
A tar build and a build of the same images extracted to folders give the same labels, sources and order:
classes are sorted as ImageFolder sorts folders, an inner tar ``C.tar`` is the folder ``C``, and images
are sorted by (folder, name) within a class.
"""
import io
import multiprocessing
import os
import posixpath
import sys
import tarfile

from tqdm import tqdm

from preprocess.sources import IMAGE_EXTENSIONS, FileSource, MissingFile, SourceError, _digest, printable

TAR_END = 1024  # two zero blocks end a tar; writers then pad with zeros (to 10240-byte records, or more)


def looks_like_tar(head):
    """True when ``head`` (a file's first 512 bytes) is a tar header: the ustar magic (POSIX, GNU), or, for
    old V7 tars without it, a checksum that holds."""
    return len(head) == 512 and (head[257:262] == b"ustar" or _checksum_ok(head))


def _checksum_ok(h):
    """The header's stored checksum equals the sum of its bytes, the checksum field counted as spaces."""
    try:
        return int(_nts(h[148:156]).strip() or b"-1", 8) == sum(h) - sum(h[148:156]) + 256
    except ValueError:
        return False


def is_gzip(path):
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class _Window(io.RawIOBase):
    """``size`` bytes of an open file from ``offset``, read with pread: an inner tar as a file of its own."""

    def __init__(self, fd, offset, size):
        self.fd, self.offset, self.size, self.pos = fd, offset, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def read(self, n=-1):
        """At most what is left of the window: a header that claims gigabytes (a pax or GNU long-name record)
        allocates no more than the archive holds."""
        n = self.size - self.pos if n is None or n < 0 else min(n, max(0, self.size - self.pos))
        if n <= 0:  # past the end (a header's size can point beyond what an offset may hold)
            return b""
        data = os.pread(self.fd, n, self.offset + self.pos)
        self.pos += len(data)
        return data

    def readinto(self, b):
        n = max(0, min(len(b), self.size - self.pos))
        if n == 0:
            return 0
        data = os.pread(self.fd, n, self.offset + self.pos)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, pos, whence=0):
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self):
        return self.pos


def _clean(name):
    """A member name as a relative path ('./a/b' and '/a/b' are 'a/b'), or None when it leaves the archive."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return None if ".." in parts else "/".join(parts)


def _root_prefix(root, shown):
    """The member-name prefix of --root: normalised as a path inside the archive ('a/b/../c' is 'a/c'); one that
    climbs out of it is refused (it used to be dropped, which packed the whole archive)."""
    if not root:
        return ""
    norm = posixpath.normpath(root.strip("/"))
    if norm == ".." or norm.startswith("../"):
        raise SourceError(f"--root {root}: climbs out of {shown}; give a folder inside the archive, as `tar tf` "
                          "lists it (e.g. ILSVRC/Data/CLS-LOC/val)")
    return "" if norm == "." else norm + "/"


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


_ZERO_BLOCK = bytes(512)
_PLAIN_TYPES = b"0\x001234567"  # files, links, devices, folders, FIFOs, contiguous files: no extension headers
_GNU_MAGIC = b"ustar  \x00"


def _nts(field):
    return field.split(b"\0", 1)[0]


def _fast_members(fd, offset, size):
    """The members of a plain ustar or GNU tar, parsed straight from their headers as tarfile would report
    them, about 5x faster than tarfile (listing ImageNet's train tar is 1.28 million headers); None for anything
    else (pax or GNU extension headers, sparse files, base-256 sizes, a bad checksum, no end marker), which
    tarfile then reads. A member is (name, data offset, size, is a regular file, is sparse, hard link target
    or None)."""
    out, pos = [], 0
    while pos + 512 <= size:
        h = os.pread(fd, 512, offset + pos)
        if h == _ZERO_BLOCK:
            return out
        if len(h) < 512 or h[156] not in _PLAIN_TYPES or h[124] & 0x80:
            return None
        if not _checksum_ok(h):
            return None
        try:
            length = int(_nts(h[124:136]).strip() or b"0", 8)
        except ValueError:
            return None
        name = _nts(h[:100])
        if h[257:263] == b"ustar\x00" and h[345]:  # POSIX ustar: a path prefix (GNU tar's magic has none)
            name = _nts(h[345:500]) + b"/" + name
        name = os.fsdecode(name)
        isdir = h[156] == ord("5") or (h[156] == 0 and name.endswith("/"))
        isfile = h[156] in b"0\x007" and not isdir
        name = name.rstrip("/") if isdir else name
        link = os.fsdecode(_nts(h[157:257])) if h[156] == ord("1") else None
        out.append((name, pos + 512, length, isfile, False, link))
        pos += 512 + ((length + 511) // 512 * 512 if isfile else 0)
    return None


def _tarfile_members(fd, offset, size):
    """The members as tarfile reads them (as ``_fast_members`` gives them), and why the listing stopped early
    (or None)."""
    try:
        tf = tarfile.open(fileobj=_Window(fd, offset, size), mode="r:")
    except tarfile.ReadError as exc:
        return [], f"not a readable tar archive ({exc})"
    members = []
    while True:
        try:
            m = tf.next()
        except tarfile.ReadError as exc:
            return members, f"the archive ends early ({exc}): it was cut short"
        if m is None:
            return members, None
        if m.size < 0:  # tarfile would step back to an earlier header: the listing would never end
            return members, f"{m.name}: its header claims a negative size; the archive is damaged"
        name = m.name
        h = os.pread(fd, 512, offset + m.offset)
        prefix = os.fsdecode(_nts(h[345:500]))
        if h[257:265] == _GNU_MAGIC and prefix and name.startswith(prefix + "/"):
            name = name[len(prefix) + 1:]  # tarfile reads a GNU header's access time as a ustar prefix
        # a sparse member's size is what it expands to; what the archive stores of it is the sum of its chunks
        stored = sum(n for _, n in m.sparse) if m.issparse() else m.size
        members.append((name, m.offset_data, stored, m.isfile(), m.issparse(), m.linkname if m.islnk() else None))


def _scan(path, offset, size):
    """The members of the tar at ``offset`` (``size`` bytes) of ``path`` (``_fast_members``), and a problem
    (not a tar, the archive ends early, or holds data that is no tar header) or None."""
    fd = os.open(path, os.O_RDONLY)
    try:
        members, problem = _fast_members(fd, offset, size), None
        if members is None:
            members, problem = _tarfile_members(fd, offset, size)
            if not members and problem:
                return [], problem
        end = max([m[1] + m[2] for m in members], default=0)
        rest = size - ((end + 511) // 512 * 512)
        last = f" after {members[-1][0]}" if members else ""
        if problem is None and rest < TAR_END:
            problem = "no end-of-archive marker: the archive was cut short"
        elif problem is None and any(os.pread(fd, min(rest, 1 << 16), offset + size - rest)):
            problem = "data that is not a tar header: the archive is damaged"
        return members, (f"{problem}; members{last} are missing" if problem else None)
    finally:
        os.close(fd)


def _scan_inner(args):
    return _scan(*args)


class TarSource(FileSource):
    """Image members of one tar: ``paths`` are their names as if extracted, ``spans`` their (offset, size)
    in the archive."""

    def __init__(self, archive, paths, spans, labels, classes, skipped=(), warnings=()):
        super().__init__(archive, paths, labels, classes, skipped, warnings)
        self.archive, self.spans, self._fd = archive, spans, None

    def digest(self):
        return _digest(self.paths, self.spans, self.labels, self.classes)

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def load(self, indices):
        if self._fd is None:
            self._fd = os.open(self.archive, os.O_RDONLY)
        end = os.fstat(self._fd).st_size
        for i in indices:
            offset, size = self.spans[i]
            data = os.pread(self._fd, max(0, min(size, end - offset)), offset)  # a claim past the end: not allocated
            if len(data) < size:
                yield MissingFile("truncated", f"the archive ends {len(data)} bytes into this {size}-byte member")
            else:
                yield data


def _folder_order(rel):
    """ImageFolder's order of image paths: by folder, then by name (``sources._walk_links``)."""
    return os.path.dirname(rel), os.path.basename(rel)


def list_tar(archive, *, root=None, labels=None, class_map=None, workers=1, quiet=True, shown=None):
    """A TarSource for ``archive``: top-level ``C.tar`` members are classes (ILSVRC-2012's train tar), and
    ``C/…/image`` members images of class C; with ``labels`` (``preprocess.imagenet_labels``), every image
    takes its class from its file name instead, wherever it is. ``root`` is the folder inside the archive to
    read (e.g. ``ILSVRC/Data/CLS-LOC/val`` in Kaggle's archive). A hard link packs its target's bytes, as
    extracting would; symbolic links, devices and damage are listed in ``skipped``. Unless ``quiet``, a
    progress bar counts the inner tars listed. Messages name the archive ``shown`` (default: ``archive``), e.g.
    the compressed original of a decompressed copy."""
    if is_gzip(archive):  # the builder decompresses it first (build_lmdb.decompressed)
        raise SourceError(f"{archive}: a gzip-compressed tar, which cannot be read in place; decompress it "
                          "(gunzip -k) and pass the .tar")
    shown = shown or archive
    prefix = _root_prefix(root, shown)
    archive_size = os.path.getsize(archive)
    outer, problem = _scan(archive, 0, archive_size)
    if problem and not outer:
        raise SourceError(f"{shown}: {problem}")
    skipped, warnings, found, spans, inner, escaped = [], [], {}, {}, [], []
    if problem:
        skipped.append({"source": shown, "reason": problem})

    def add(name, offset, length, isfile, sparse, link, where):
        full = _clean(name)
        if full is None:
            skipped.append({"source": printable(where + name), "reason": "member name leaves the archive ('..'); "
                                                                          "not read"})
            return
        if isfile and length < 0:
            skipped.append({"source": printable(where + name), "reason": "its header claims a negative size; not read"})
            return
        if isfile and not sparse:
            spans[full] = (offset, length)
        elif link is not None and _clean(link) in spans:
            spans[full] = spans[_clean(link)]  # a hard link: its target's bytes, as extracting gives
        if not full.startswith(prefix) or not _is_image(full):
            return
        rel = printable(full[len(prefix):])
        if rel != full[len(prefix):]:
            escaped.append(rel)
        if full not in spans:
            why = (f"a hard link to {link}, which is not in the archive before it" if link is not None else
                   "not a regular file in the archive (a symbolic link, device or sparse file); not followed")
            skipped.append({"source": rel, "reason": why})
            return
        if rel in found:
            warnings.append({"source": rel, "reason": "in the archive twice; the later copy is packed, as tar "
                                                      "would extract it"})
        found[rel] = spans[full]
        return True

    for name, offset, length, isfile, sparse, link in outer:
        rel = _clean(name)
        if isfile and rel and rel.lower().endswith(".tar") and "/" not in rel and not prefix and labels is None:
            inner.append(((archive, offset, max(0, min(length, archive_size - offset))), rel))
        else:
            add(name, offset, length, isfile, sparse, link, "")
    if inner:
        pool = multiprocessing.get_context("fork").Pool(min(workers, len(inner))) if workers > 1 else _Serial()
        with pool:
            scans = tqdm(pool.imap(_scan_inner, [args for args, _ in inner], chunksize=4), total=len(inner),
                         unit="tar", file=sys.stderr, desc=f"listing {os.path.basename(shown)}", disable=quiet,
                         dynamic_ncols=True)
            for ((_, offset, _), rel), (members, problem) in zip(inner, scans):
                where = f"{shown}:{rel}"
                if problem:
                    skipped.append({"source": where, "reason": problem})
                if not members and problem:
                    continue  # not a tar: listed in skipped, no class
                cls, images = rel[:-4], 0
                for name, off, length, isfile, sparse, link in members:
                    images += bool(add(f"{cls}/{name}", offset + off, length, isfile, sparse,
                                       None if link is None else f"{cls}/{link}", f"{where}:"))
                if not images and not problem:  # (a class tar added twice, as `tar -r` does, has its images)
                    raise SourceError(f"{where}: class tar holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                                      "remove it or add its images")
    if escaped:
        warnings.append({"source": shown, "reason": f"{len(escaped)} member name(s) are not UTF-8 (e.g. "
                                                    f"{escaped[0]}); their sources are written with \\x escapes"})
    where_root = f" under {root}" if prefix else ""
    if not found:
        raise SourceError(f"{shown}: no image members{where_root} ({', '.join(IMAGE_EXTENSIONS)})")
    if labels is not None:
        paths = sorted(found, key=_folder_order)
        names = [labels.class_of(p, shown) for p in paths]
        classes = labels.classes(class_map)
        index = {c: i for i, c in enumerate(classes)}
        return TarSource(archive, paths, [found[p] for p in paths], [index[c] for c in names], classes, skipped,
                         warnings)
    flat = sorted(r for r in found if "/" not in r)
    paths = sorted((r for r in found if "/" in r and not r.startswith(".")),
                   key=lambda r: (r.split("/", 1)[0],) + _folder_order(r))
    if not paths:
        raise SourceError(f"{shown}: {len(flat)} image(s){where_root} (e.g. {flat[0]}) and no class folder; give "
                          "their labels with --labels FILE (LOC_val_solution.csv, or the devkit's "
                          "ILSVRC2012_validation_ground_truth.txt), or read a folder of the archive with --root")
    for r in flat:  # ImageFolder reads class folders only
        skipped.append({"source": r, "reason": "outside any class folder; not packed"})
    classes = sorted({r.split("/", 1)[0] for r in paths})
    if class_map is not None:
        for c in classes:
            if c not in class_map:
                raise SourceError(f"{shown}: class {c!r} is not among the --classes-from split's "
                                  f"{len(class_map)} classes")
        index = class_map
        classes = sorted(class_map, key=class_map.get)
    else:
        index = {c: i for i, c in enumerate(classes)}
    return TarSource(archive, paths, [found[p] for p in paths], [index[p.split("/", 1)[0]] for p in paths], classes,
                     skipped, warnings)


class _Serial:
    """``Pool.imap`` in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)
