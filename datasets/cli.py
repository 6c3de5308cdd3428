"""How every command of the project ends on an error it can explain: one line on stderr naming the file, line,
key or record at fault and what to do, and exit status 2. Status 1 stays for bugs, which keep their traceback.

``run(main, errors)`` wraps a command's ``main``: ``errors`` are the command's own exception types (their
messages already name what is wrong); operating-system and LMDB errors are explained here.
"""
import errno
import sys

import lmdb

EXPLAINED_EXIT = 2

_REMEDY = {
    errno.ENOSPC: "no space left on the device; free some space and run the same command again",
    errno.EDQUOT: "disk quota exceeded; free some space and run the same command again",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n 65536) or use fewer workers",
    errno.ENFILE: "too many open files on this machine; close some, or use fewer workers",
    errno.EACCES: "permission denied; check the file's permissions",
    errno.EROFS: "read-only filesystem; write somewhere else",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory; give a file",
    errno.ENOTDIR: "a part of the path is not a directory",
}


def explain(exc):
    """One line for an OSError or an LMDB error: the path and what to do."""
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else ""
        what = _REMEDY.get(exc.errno, exc.strerror or str(exc))
        return f"{where}: {what}" if where else what
    if isinstance(exc, lmdb.Error):
        return f"LMDB: {exc}; run python -m preprocess.verify on the split, and rebuild or restore the shard it names"
    return str(exc)


def run(main, errors=(), argv=None):
    """``sys.exit`` with main's status; explained errors print one line and exit 2."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except (*errors, OSError, lmdb.Error) as exc:
        print(f"error: {' '.join(explain(exc).split())}", file=sys.stderr)
        code = EXPLAINED_EXIT
    sys.exit(code)
