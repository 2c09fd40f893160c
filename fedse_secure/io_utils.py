"""Crash-safe file writes: nothing the framework records may be half-written or lost on a crash.

Three promises, whatever stops the process (SIGKILL, power loss, a full disk):

* a file written with :func:`atomic_write_bytes` (and friends) holds its old or its new content, never half;
* a JSON-lines file appended with :func:`append_jsonl` holds every acknowledged line; a line torn by a crash or a
  full disk is cut off before the next append writes anything (it was never acknowledged), so the file always
  parses, and :func:`read_jsonl` skips a torn last line it finds before that;
* a write that fails for lack of space (or a read-only disk, a missing permission, a path under a file) raises
  :class:`StorageError`: one line naming the file and the fix, with every file left readable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedse_secure.errors import FedseError

#: Errors that mean "the disk is full": the fix is the same for all of them.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class StorageError(FedseError, OSError):
    """A file could not be written or read back: the message names the file, the cause and the fix. Also an
    ``OSError``, so callers that handle I/O failures in general still catch it."""

    exit_code = 1

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorruptFileError(FedseError, ValueError):
    """A file the framework wrote no longer parses (edited, truncated in the middle, overwritten)."""


def storage_error(path: str | Path, err: OSError, action: str = "write") -> StorageError:
    """The one-line :class:`StorageError` for an ``OSError`` hit while doing ``action`` on ``path``."""
    if isinstance(err, StorageError):
        return err
    code = err.errno
    if code in _NO_SPACE:
        fix = "the disk is full; free some space and run the command again (completed work is kept)"
    elif code == errno.EROFS:
        fix = "the file system is read-only; choose a writable location"
    elif code in (errno.EACCES, errno.EPERM):
        fix = "permission denied; choose a folder you can write to or fix its permissions"
    elif code == errno.ENOTDIR:
        fix = "a part of that path is a file, not a folder; choose another path"
    elif code == errno.EEXIST:
        fix = "a file is in the way where a folder is needed; move that file away or choose another path"
    elif code == errno.ENOENT:
        parent = Path(path).parent
        if action in ("read", "repair") or (action == "use" and parent.is_dir()):
            fix = "it does not exist; check the path"
        elif parent.is_dir():  # /proc, a read-only overlay: the folder is there but takes no new entries
            fix = f"{parent} does not take new files or folders; choose a folder you can write to"
        else:
            fix = f"the folder {parent} does not exist; create it first or choose another path"
    elif code == errno.EISDIR:
        fix = "that path is a folder; name a file"
    elif code == errno.ENAMETOOLONG:
        fix = "the name is too long for the file system; choose a shorter name"
    elif code == errno.ELOOP:
        fix = "the path goes through a symbolic link loop or a refused link; use a real path"
    else:
        fix = err.strerror or type(err).__name__
    out = StorageError(f"cannot {action} {path}: {fix}")
    out.errno, out.filename = code, str(path)
    return out


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_dir(path: str | Path) -> Path:
    """``mkdir -p`` that fails with a :class:`StorageError` (one line) instead of a bare ``OSError``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # FileExistsError: a file sits where the folder should be
        raise storage_error(path, err, "create the folder") from None
    return path


def writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove a file can be written there, so that a command asked to write plots
    fails before its work (training, a long table), not after it; :class:`StorageError` (one line) otherwise."""
    path = ensure_dir(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".fedse-write-probe.", dir=path)
    except OSError as err:
        raise storage_error(path, err, "write plots to") from None
    os.close(fd)
    os.unlink(probe)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary sibling, fsync, then rename over ``path`` (readers see old or new, never half)."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _unlink_quietly(tmp)
        raise storage_error(path, err) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)
    return path


def _unlink_quietly(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_folder(final: str | Path, build: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Build a folder in a temporary sibling, fsync its files, then rename it into place.

    A crash never leaves half a folder under ``final``. With ``replace`` an existing folder is swapped out (moved
    aside first, deleted after), so ``final`` always holds a complete old or new version; without it, an
    existing complete folder (another process finished first) is kept.
    """
    final = Path(final)
    ensure_dir(final.parent)
    tmp = old = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        build(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists() and replace:
            old = final.parent / f".{final.name}.old-{os.getpid()}.tmp"
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir() or not any(final.iterdir()):
                raise
        fsync_dir(final.parent)
    except OSError as err:
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)  # put the complete old version back
        raise storage_error(final, err) from None
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return final


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


@contextlib.contextmanager
def _locked_append(path: Path) -> Iterator[int]:
    """The file open for appending under an exclusive lock (appenders in other processes wait)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _complete_length(fd: int) -> int:
    """Bytes up to and including the last newline: everything after it is a line torn by a crash."""
    size = os.fstat(fd).st_size
    end = size
    chunk = 1 << 16
    while end > 0:
        start = max(0, end - chunk)
        block = os.pread(fd, end - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def repair_torn_tail(path: str | Path) -> int:
    """Cut off a torn last line (a write interrupted by a crash or a full disk; it was never acknowledged).
    Returns how many bytes were removed."""
    path = Path(path)
    if not path.exists():
        return 0
    try:
        with _locked_append(path) as fd:
            return _repair(fd)
    except OSError as err:
        raise storage_error(path, err, "repair") from None


def _repair(fd: int) -> int:
    size = os.fstat(fd).st_size
    keep = _complete_length(fd)
    if keep < size:
        os.ftruncate(fd, keep)
        os.fsync(fd)
    return size - keep


def append_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Append whole lines and fsync before returning, so an acknowledged record survives a crash.

    A torn last line left by an earlier crash is cut off first (appending onto it would glue two records into
    one unreadable line). If this append fails part-way (a full disk), the file is cut back to where it was, so
    it stays readable, and :class:`StorageError` says what happened.
    """
    if not records:
        return
    path = Path(path)
    ensure_dir(path.parent)
    data = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records).encode("utf-8")
    try:
        with _locked_append(path) as fd:
            _repair(fd)
            before = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):  # best effort: the reader skips a torn tail anyway
                    os.ftruncate(fd, before)
                    os.fsync(fd)
                raise
    except OSError as err:
        raise storage_error(path, err, "append to") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read complete lines; a torn final line (crash mid-append) is ignored rather than fatal. A complete line
    that is not a JSON object means the file was damaged: :class:`CorruptFileError` names the line."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise storage_error(path, err, "read") from None
    out = []
    lines = raw.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):  # the last piece is "" or a torn line
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            reason = "nested too deeply" if isinstance(err, RecursionError) else type(err).__name__
            raise CorruptFileError(f"{path} line {number} is not valid JSON ({reason}); the file was damaged: restore "
                                   "it from a backup or move it away") from None
        if not isinstance(record, dict):
            raise CorruptFileError(f"{path} line {number} is not a JSON object; the file was damaged: restore it from "
                                   "a backup or move it away")
        out.append(record)
    return out


class OutputPathError(FedseError, ValueError):
    """An output option names a path it must not write: a folder, a ledger or audit log, another kind of file."""


def is_ledger_or_audit_log(path: str | Path) -> bool:
    """A privacy ledger or an audit log, or one of their sidecars (``.head``, ``.lock``): by the names fedse gives
    them, or under any name by the sealed ``<file>.head`` that :mod:`fedse_secure.audit.chain` keeps beside each."""
    path = Path(path)
    name = path.name
    log = name[: -len(".head")] if name.endswith((".head", ".lock")) and len(name) > len(".head") else name
    return "ledger" in name or name.startswith("audit.jsonl") or path.with_name(log + ".head").is_file()


def check_output_file(path: str | Path, option: str, kind: str, example: str,
                      is_kind: Callable[[Path], bool]) -> None:
    """Refuse, before anything is written, an output path that is a folder, a privacy ledger or audit log (never
    replaced, whatever the flags), or an existing file ``is_kind`` does not recognise as ``kind``: an output
    option replaces only the kind of file its command writes."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; pass a file name such as {example}")
    if is_ledger_or_audit_log(path):
        raise OutputPathError(f"{option} {path} is a privacy ledger or audit log, which is never replaced; pass "
                              f"another file name such as {example}")
    if os.path.lexists(path):
        try:
            ours = path.is_file() and is_kind(path)
        except (OSError, ValueError, FedseError):  # unreadable or unparsable: not a file this command wrote
            ours = False
        if not ours:
            raise OutputPathError(f"{option} {path} already exists and is not {kind}, so it is not replaced; move it "
                                  f"away or pass another file name such as {example}")


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
