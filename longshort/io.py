"""Files: atomic writes, jsonl with errors that name the file and line, content digests, file locks."""

from __future__ import annotations

import codecs
import errno
import fcntl
import filecmp
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Test-only fault injection: ``LONGSHORT_FAULT_AFTER=<event>`` makes the process SIGKILL itself at the
# first ``fault_point(<event>)`` it reaches (tests/test_faults.py). Events: ``write:<file name>`` (inside
# ``atomic_write_bytes``, after the temporary file is written and before the rename), ``record:<stage>``
# (a stage's record.json was just saved), ``rl-checkpoint:<step>`` (RL checkpoint ``step`` was just saved).
FAULT_ENV = "LONGSHORT_FAULT_AFTER"
log = logging.getLogger(__name__)
# The temporary files of ``atomic_write_bytes``: ``.<name>.<random>.tmp`` next to the target.
TEMP_GLOB = ".*.tmp"


# One jsonl row, line ending excluded. A long-CoT trace of 32k tokens is ~150 kB; a longer line is
# almost surely a broken file (no newlines), and is refused after reading no more than this much.
MAX_LINE_BYTES = 16 * 1024 * 1024


class DataError(ValueError):
    """A malformed input file; the message names the file and line."""


class OutputError(OSError):
    """An output that cannot be written (a file where a folder should be, no permission, disk full).

    The message names the path and the reason; the temporary file of an atomic write is removed.
    """

    def __init__(self, path: Path, cause: OSError, reason: str | None = None) -> None:
        super().__init__(cause.errno, f"cannot write {path}: {reason or cause.strerror or cause}")

    def __str__(self) -> str:
        return str(self.strerror)


def ensure_dir(path: Path) -> Path:
    """Create a folder and its parents, or raise OutputError naming the folder (and a file in the way)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        raise OutputError(path, exc, f"{blocker} is a file, not a folder" if blocker else None) from exc
    return path


def fault_point(event: str) -> None:
    """SIGKILL this process here when ``$LONGSHORT_FAULT_AFTER`` names ``event`` (a test hook; a no-op otherwise).

    A real ``kill -9`` at a named point: no ``finally`` blocks, no atexit, no flushing, exactly what a crash
    or an OOM kill leaves on disk; timing a kill from outside by polling races the next write.
    """
    if os.environ.get(FAULT_ENV) == event:
        os.kill(os.getpid(), signal.SIGKILL)


def _process_umask() -> int:
    mask = os.umask(0o022)  # read it by setting it: once, at import, before any worker thread starts
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_process_umask()  # what open(path, "w") would give (mkstemp makes 0600)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    The file gets the mode a plain ``open(path, "w")`` would (0666 less the umask), so a shared
    workspace, a DVC or MLflow server run by another user can read it; ``mode`` overrides that (0o600 for a
    secret, which is then never readable by others, not even for a moment). Any OSError (disk full, no permission, a file where the folder should be) becomes an
    OutputError naming ``path``; the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    ensure_dir(path.parent)
    tmp = write_temp(path, data, mode)
    try:
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(path, exc) from exc
        raise


def write_temp(path: Path, data: bytes, mode: int | None = None) -> Path:
    """``data`` in a new temporary file next to ``path`` (named as ``remove_stale_temps`` finds them), with the
    mode ``atomic_write_bytes`` gives, fsynced; the caller renames it. An OSError becomes an OutputError naming
    ``path``, and no temporary file is left."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE if mode is None else mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(path, exc) from exc
        raise
    return Path(tmp)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


# What fsync(2) of a folder returns on a filesystem that has no such operation (CIFS before Linux 4.17, SMB
# shares on macOS, ...): the folder cannot be flushed there, which is not an error of the save (PostgreSQL, borg
# and restic ignore the same codes). A file's fsync error, and EIO for a folder, stay errors.
_FOLDER_SYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})
_folder_sync_warned: set[int] = set()


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not flags & os.O_DIRECTORY or exc.errno not in _FOLDER_SYNC_UNSUPPORTED:
            raise
        if (dev := os.fstat(fd).st_dev) not in _folder_sync_warned:
            _folder_sync_warned.add(dev)
            log.warning("%s: this filesystem cannot flush folders (fsync: %s); a rename into it is durable "
                        "only once the filesystem writes it back", path, exc.strerror)  # fmt: skip
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, and the folders that name them, to disk.

    Call it on a folder written in full (a saved model, a checkpoint) before renaming it into place: the rename
    is then the moment the folder becomes whole, also after a power cut, which without it can leave the new
    name pointing at files whose data never reached the disk.
    """
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder), os.O_RDONLY | os.O_DIRECTORY)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    _fsync_path(Path(path), os.O_RDONLY | os.O_DIRECTORY)


def replace_tree(src: Path, dst: Path) -> None:
    """Put the folder ``src``, written in full, in the place of ``dst`` (removed first, if there), durably:
    ``src`` is flushed before the rename and ``dst``'s parent after it (``fsync_tree``)."""
    fsync_tree(src)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def restore_environ(before: Mapping[str, str | None]) -> None:
    """Put environment variables back as ``before`` has them (``{name: os.environ.get(name)}`` taken earlier):
    a value is set again, None removes the variable."""
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files that a killed ``atomic_write_bytes`` left under ``folder``; return them.

    Only safe while no other process writes there (``_run_stage`` calls it under the folder's lock).
    """
    stale = [p for p in Path(folder).rglob(TEMP_GLOB) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) for the ``with`` block.

    Other processes (and other open file descriptions in this one) block until it is released; the kernel
    releases it when the holder dies, so a ``kill -9`` never leaves a stale lock. ``on_wait`` is called
    once if the lock is busy, before blocking. Local filesystems only (flock is advisory, per host).
    """
    path = Path(path)
    ensure_dir(path.parent)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def dumps_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, dumps_jsonl(rows))


def iter_jsonl(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for every non-blank line of a jsonl file.

    Anything else raises DataError naming ``path:line``: a line longer than ``max_line_bytes``
    (default 16 MiB; no more than that is read), bytes that are not UTF-8, text that is not JSON
    (including numbers over Python's 4300-digit limit and nesting too deep to parse), a value that
    is not an object, and a string with an unpaired surrogate escape such as ``"\\ud800"`` (valid
    JSON, but it could not be written back as UTF-8).
    """
    path = Path(path)
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(max_line_bytes + 2):  # the line ending, and one byte to tell "too long"
            lineno += 1
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # a byte-order mark, as some editors write
                raw = raw[len(codecs.BOM_UTF8) :]
            if len(raw.rstrip(b"\r\n")) > max_line_bytes:
                raise DataError(f"{path}:{lineno}: line is longer than the limit of {max_line_bytes} bytes")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
            except ValueError as exc:  # an integer over sys.get_int_max_str_digits()
                raise DataError(f"{path}:{lineno}: not valid JSON: {exc}") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: not valid JSON: nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if "\\u" in text:  # only an escape can produce a lone surrogate: decoded UTF-8 never holds one
                try:
                    json.dumps(row, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError as exc:
                    bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode()
                    raise DataError(f"{path}:{lineno}: a string holds an unpaired surrogate ({bad})") from None
            yield lineno, row


def require_str(path: Path, lineno: int, row: dict[str, Any], field: str, *, allow_empty: bool = False) -> str:
    """``row[field]`` as a non-empty string, or a DataError naming the file, line and field."""
    if field not in row:
        raise DataError(f"{path}:{lineno}: missing field '{field}'")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{path}:{lineno}: field '{field}' is empty")
    return value


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (``md5`` is DVC's content digest, not for security)."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(path: Path) -> str:
    """Digest of a file, or of a directory's relative paths and file contents."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for rel in _tree_files(path):
        h.update(rel.as_posix().encode() + b"\0" + file_digest(path / rel).encode())
    return h.hexdigest()


def _tree_files(root: Path) -> list[Path]:
    """The files under ``root``, relative to it, in sorted order."""
    return sorted(q.relative_to(root) for q in root.rglob("*") if q.is_file())


def same_tree(a: Path, b: Path) -> bool:
    """Whether two files or folders hold the same relative paths and bytes, as equal ``tree_digest`` s would say,
    but stopping at the first difference (``filecmp``, by content): two different 7B model folders cost a few MB
    of reading instead of hashing both (30 s or more); only identical ones are read through."""
    a, b = Path(a), Path(b)
    if a.is_file() or b.is_file():
        return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)
    files = _tree_files(a)
    if files != _tree_files(b):
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
