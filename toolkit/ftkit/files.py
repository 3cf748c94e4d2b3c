"""Atomic file writes (a reader, or a crash, never sees half a file) and bounded reads of
files that someone else may have put in place (never blocking, never through a link), and
opening logs without following links (ftkit never writes through a link in a run directory)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, mode: int = 0o666) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target.

    The file gets `mode` less the umask, as `open()` would create it (0644 under the usual
    umask 022): the one rule for every file ftkit writes, reports and stacks alike. Callers
    whose files must never be writable by others (a run's own records, which a resume
    trusts) pass 0o644. The temp file is created with O_EXCL and O_NOFOLLOW under a random
    name, so nothing planted in the directory - a link above all - is written through."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _create_temp(target: Path, mode: int) -> tuple[int, str]:
    """A new, empty file beside `target` under a random name, created `mode` & ~umask by the
    kernel (not tempfile.mkstemp, whose 0600 would leave every file ftkit writes private
    while the PNGs beside them follow the umask). O_EXCL: never an existing file or link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = str(target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(target.parent))  # pragma: no cover


def current_umask() -> int:
    """The process's umask, read without changing it (/proc/self/status; Linux 4.7+), else by
    setting and restoring it at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: str | os.PathLike[str]) -> None:
    """Files under `root` that a library created 0600 (safetensors' save_file does, whatever the
    umask) get the mode every file ftkit writes has: 0666 less the umask. Only regular files
    this process owns, never through a link; a file that cannot be changed is left as it is."""
    want = 0o666 & ~current_umask()
    me = os.geteuid()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
                if not (stat.S_ISREG(st.st_mode) and st.st_uid == me and stat.S_IMODE(st.st_mode) == 0o600 != want):
                    continue
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue
            try:
                if os.fstat(fd).st_ino == st.st_ino:  # the file looked at, not one put there since
                    os.fchmod(fd, want)
            except OSError:
                pass
            finally:
                os.close(fd)


def write_json(path: str | os.PathLike[str], data: Any, *, mode: int = 0o666) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", mode=mode)


JSON_MAX_BYTES = 64 << 20  # ftkit's own records are KB to a few MB; anything larger is not one of them


class UnreadableJson(json.JSONDecodeError):
    """A file (or line) that is not the JSON ftkit wrote: not UTF-8, not JSON, nested too
    deep, a number too long to convert. A JSONDecodeError (so a ValueError), so every caller
    that handles a torn file handles these too; `reason` is the short cause."""

    def __init__(self, reason: str, doc: str = "", pos: int | None = None) -> None:
        super().__init__(reason, doc, pos or 0)
        self.reason = reason
        self.located = pos is not None  # lineno and colno say where (a JSON syntax error)

    def at(self, path: str | os.PathLike[str]) -> str:
        """`FILE:LINE:COL: reason` where the place is known, else `FILE: reason`."""
        return f"{path}:{self.lineno}:{self.colno}: {self.reason}" if self.located else f"{path}: {self.reason}"


def parse_json(data: bytes | str) -> Any:
    """json.loads for bytes that came from a file: every way it can fail is UnreadableJson."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise UnreadableJson(f"not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except UnreadableJson:
        raise
    except json.JSONDecodeError as e:
        raise UnreadableJson(f"not JSON: {e.msg}", e.doc, e.pos) from None
    except RecursionError:
        raise UnreadableJson("nested too deep") from None
    except ValueError as e:  # an integer of 100,000 digits
        raise UnreadableJson(f"not JSON ftkit reads: {str(e)[:100]}") from None


def read_json(path: str | os.PathLike[str], max_bytes: int = JSON_MAX_BYTES) -> Any:
    """A JSON file ftkit wrote, read as if anyone could have put it there: without blocking,
    not through a final symlink, regular files only, at most `max_bytes`. A missing file is
    FileNotFoundError as ever; anything else wrong is an OSError (UnsafeFile) or a ValueError
    (UnreadableJson), so callers handle it as they handle a torn file."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise UnsafeFile(path, "a symlink (ftkit reads no links here)" if e.errno == errno.ELOOP
                             else "not a regular file") from e
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(path, f"{_kind(st.st_mode)}, not a regular file")
        data = read_fd_bounded(fd, path, max_bytes)
    finally:
        os.close(fd)
    return parse_json(data)


# -- reading files that someone else may have put there ---------------------------------------

class UnsafeFile(OSError):
    """A file ftkit will not read: not a regular file, a link, too large, or unreadable.
    `reason` is the short cause for a one-line message ("a FIFO, not a regular file")."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class TooLarge(UnsafeFile):
    """A file over the reader's limit: callers that name their own limit ("the limit is 1 MiB")
    catch this one apart from the rest."""

    def __init__(self, path: str | os.PathLike[str], size: int | None, max_bytes: int) -> None:
        super().__init__(path, f"{size} bytes, more than the {max_bytes} ftkit reads" if size is not None
                         else f"more than the {max_bytes} bytes ftkit reads")
        self.size = size
        self.max_bytes = max_bytes


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], *, dir_fd: int | None = None, follow: bool = False) -> int:
    """A read-only descriptor on a regular file, never blocking and never through a final
    symlink: a FIFO, a device or a socket in a shared or handed-over directory must not
    hang the reader, and a link must not lead it elsewhere. The caller closes it.

    `follow=True` is for files a person named (a recipe, a model's weights: the HF cache's
    snapshots are links into its blobs): links are followed, everything else holds. This is
    ftkit's one bounded reader of outside files (config text, model files, lock files, its
    own records); the type is checked on the descriptor, so a rename cannot race it."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    if not follow:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFile(path, "a symlink (ftkit reads no links here)") from e
        reason = e.strerror or str(e)
        if e.errno == errno.ENXIO:  # a socket (or a FIFO nobody writes, opened for writing)
            with contextlib.suppress(OSError):
                reason = f"{_kind(os.lstat(path, dir_fd=dir_fd).st_mode)}, not a regular file"
        raise UnsafeFile(path, reason) from e
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise UnsafeFile(path, e.strerror or str(e)) from e
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFile(path, f"{_kind(st.st_mode)}, not a regular file")
    return fd


def read_bounded(path: str | os.PathLike[str], max_bytes: int, *, tail: bool = False,
                 follow: bool = False) -> bytes:
    """A regular file's bytes, at most `max_bytes` of them (see open_regular). A larger
    file is refused (TooLarge), or with `tail=True` only its last `max_bytes` are returned
    (journals read from the end)."""
    fd = open_regular(path, follow=follow)
    try:
        return read_fd_bounded(fd, path, max_bytes, tail=tail)
    finally:
        os.close(fd)


def read_fd_bounded(fd: int, path: str | os.PathLike[str], max_bytes: int, *, tail: bool = False) -> bytes:
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes and not tail:
            raise TooLarge(path, size, max_bytes)
        start = max(0, size - max_bytes) if tail else 0
        chunks, got = [], 0
        while got < max_bytes:  # the size may change under us; the cap holds regardless
            chunk = os.pread(fd, min(1 << 20, max_bytes - got), start + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if not tail and os.pread(fd, 1, start + got):
            raise TooLarge(path, None, max_bytes)
        return b"".join(chunks)
    except OSError as e:
        if isinstance(e, UnsafeFile):
            raise
        raise UnsafeFile(path, e.strerror or str(e)) from e


def open_append(path: str | os.PathLike[str], *, binary: bool = False) -> IO[Any]:
    """Open a log for appending, created 0644 when missing, never through a symlink and never
    a FIFO or device (O_NOFOLLOW, O_NONBLOCK for the open, then a regular-file check): a link
    planted where a log goes must not send ftkit's writes elsewhere. Raises OSError naming
    the path."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:  # the last component is a symlink
            raise OSError(e.errno, "a symbolic link: ftkit does not write through links", str(path)) from None
        if e.errno == errno.ENXIO:  # a FIFO nobody reads (O_NONBLOCK: refused, not a hang)
            raise OSError(e.errno, "not a regular file: ftkit writes logs only to regular files", str(path)) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file: ftkit writes logs only to regular files", str(path))
        os.set_blocking(fd, True)
        if binary:
            return os.fdopen(fd, "ab")
        return os.fdopen(fd, "a", encoding="utf-8", errors="replace")
    except BaseException:
        os.close(fd)
        raise
