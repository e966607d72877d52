"""Small file helpers every job shares: atomic writes, text and prompt files, image checks, hashes, and the lock
that keeps two runs out of one output folder.

Atomic means written under a temporary name unique to the process (``.{name}.{pid}.{token}.tmp`` beside the
target) and moved into place with ``os.replace``, so a reader never sees half a file, an interrupted run leaves
no damaged output and two processes never write the same temporary file. Every atomic writer goes through
:func:`atomic_target`: on any error the temporary file is removed, and an ``OSError`` (disk full, permissions)
becomes a :class:`WriteError` whose message is one line naming the folder. Caches are read with
:func:`read_cache`: a damaged one is recomputed (with a warning), never a dead end. The JSON records a run keeps
of what a folder holds (generation plans, a base model's identity, hand-over journals) are not caches and are read
with :func:`read_json`: a damaged one stops the run with a :class:`DamagedFileError`, one line saying what to do.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import secrets
import socket
import sys
import warnings
from os import PathLike
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
from PIL import Image

TEMP_SUFFIX = ".tmp"
LOCK_FILE = ".lock"
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------- atomic writes
class WriteError(OSError):
    """A file could not be written (disk full, no permission, ...). ``str()`` is one line naming the folder and
    the reason, e.g. ``cannot write images to /x/y: No space left on device (errno 28)``; ``errno`` is the
    operating system's."""

    def __str__(self) -> str:
        return str(self.strerror)


def temp_name(path: str | PathLike) -> Path:
    """A temporary name beside ``path``, unique to this process and call (hidden; ends in ``.tmp``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def temp_in_use(path: str | PathLike) -> bool:
    """True if ``path`` is a temporary file (:func:`temp_name`: ``.{name}.{pid}.{8 hex}.tmp``) of another process
    still running on this host, which a clean-up of leftovers must not remove."""
    name = Path(path).name
    parts = name[:-len(TEMP_SUFFIX)].split(".") if name.endswith(TEMP_SUFFIX) else []
    if len(parts) < 4 or len(parts[-1]) != 8 or not parts[-2].isdigit():
        return False
    pid = int(parts[-2])
    return pid != os.getpid() and _pid_alive(pid)


def write_error(e: OSError, path: str | PathLike, what: str | None = None) -> WriteError:
    """``e`` (raised while writing ``path``) as a one-line :class:`WriteError` naming ``path``'s folder."""
    if isinstance(e, WriteError):
        return e
    path = Path(path)
    reason = e.strerror or str(e) or type(e).__name__
    code = f" (errno {e.errno})" if e.errno else ""
    return WriteError(e.errno or 0, f"cannot write {what or path.name} to {path.parent}: {reason}{code}")


@contextlib.contextmanager
def atomic_target(path: str | PathLike, what: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block has written it, move it onto ``path``.

    On any error the temporary file is removed and ``path`` is left as it was; an ``OSError`` is raised again
    as a :class:`WriteError` (``what``: the thing written, for its message; default: the file's name)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise write_error(e, path, what) from None
        raise


def write_bytes_atomic(path: str | PathLike, write: Callable[[object], None], what: str | None = None,
                       sync: bool = True) -> None:
    """Create ``path`` atomically: ``write(f)`` fills an open binary file (flushed to disk first if ``sync``)."""
    with atomic_target(path, what) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str, what: str | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace`` (see :func:`atomic_target`)."""
    write_bytes_atomic(path, lambda f: f.write(text.encode("utf-8")), what)


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a text file without their line endings (a final empty line is not a line)."""
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def image_is_complete(path: str | os.PathLike, size: tuple[int, int] | None = None) -> bool:
    """True if ``path`` is a readable, undamaged image file (``PIL.Image.verify``) of ``size`` (W, H)."""
    try:
        with Image.open(path) as im:
            if size is not None and im.size != tuple(size):
                return False
            im.verify()
        return True
    except Exception:  # missing, truncated, corrupt, not an image
        return False


def save_png_atomic(array: np.ndarray, path: str | os.PathLike, what: str = "images") -> None:
    """Write an HxWx3 uint8 array as a PNG through a temporary name and ``os.replace`` (:func:`atomic_target`)."""
    # no fsync: thousands of images per run, and a lost image is remade by the next run (never half-read)
    write_bytes_atomic(path, lambda f: Image.fromarray(array).save(f, format="PNG"), what, sync=False)


def save_figure_atomic(fig, path: str | os.PathLike, what: str = "a plot", **savefig) -> None:
    """``fig.savefig`` (matplotlib) to ``path`` through a temporary name (:func:`atomic_target`); the format is
    ``path``'s suffix."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    write_bytes_atomic(path, lambda f: fig.savefig(f, format=fmt, **savefig), what)


def read_prompts(path: str | PathLike) -> list[str]:
    """Non-empty, stripped lines of a prompt file. Duplicates are kept (the reference does too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                         f"save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file has no non-empty lines: {path}")
    return prompts


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- folder lock
class FolderLocked(RuntimeError):
    """Another run holds the output folder (:func:`lock_folder`); the message names it and what to do."""


def _holder_text(h: dict) -> str:
    return (f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"
            + (f": {h['command']}" if h.get("command") else ""))


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's process (or an unreadable pid): not ours to call dead
    return True


class FolderLock:
    """The lock file ``{folder}/.lock`` of one process: JSON naming the holder (host, pid, command, start time)
    and, where the file system has them, an ``flock`` the kernel drops when the holder dies. Use
    :func:`lock_folder`."""

    def __init__(self, folder: Path, command: str):
        self.folder, self.path, self.command = folder, folder / LOCK_FILE, command
        self.fd: int | None = None
        self.depth = 0

    def acquire(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except FolderLocked:
            raise
        except OSError as e:  # disk full, no permission: one line naming the folder
            raise write_error(e, self.path, "the lock file") from None

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            kernel = self._flock(fd)
            if kernel is False:  # held: a live process on a file system with locks
                holder = self._read(fd)
                os.close(fd)
                raise FolderLocked(f"{self.folder} is in use by another run ({_holder_text(holder)}); wait for it "
                                   f"to finish, or choose another output folder")
            try:  # a holder that was releasing may have removed the file we opened: lock the new one
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        holder = self._read(fd)
        if holder:
            self._take_over(fd, holder, kernel)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        data = (json.dumps(record) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except OSError:
            os.unlink(self.path)  # still ours (locked): a half-written lock would only confuse the next run
            os.close(fd)
            raise
        self.fd = fd

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: locked; False: another process holds it; None: this file system has no locks."""
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise

    @staticmethod
    def _read(fd: int) -> dict:
        """The holder recorded in the lock file; {} when empty, {"unreadable": ...} when damaged."""
        data = os.pread(fd, 1 << 16, 0)
        if not data.strip():
            return {}
        try:
            holder = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"unreadable": True}
        return holder if isinstance(holder, dict) else {"unreadable": True}

    def _take_over(self, fd: int, holder: dict, kernel: bool | None) -> None:
        """A lock file left behind: take it over when its holder is gone, else refuse."""
        here = holder.get("host") == socket.gethostname()
        if holder.get("unreadable"):
            pass  # a crash while it was being written (with locks: nobody holds it)
        elif not here:
            os.close(fd)
            raise FolderLocked(f"{self.folder} is locked by a run on another host ({_holder_text(holder)}), which "
                               f"cannot be checked from here: if that run has ended, delete {self.path}")
        elif kernel is None and _pid_alive(holder.get("pid")) and holder.get("pid") != os.getpid():
            os.close(fd)
            raise FolderLocked(f"{self.folder} is in use by another run ({_holder_text(holder)}); wait for it "
                               f"to finish, or choose another output folder")
        what = "an unreadable lock" if holder.get("unreadable") else f"the lock of {_holder_text(holder)}"
        print(f"note: {self.folder}: took over {what}, which is no longer running", file=sys.stderr)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)  # while still locked: nobody can take a file that is about to go
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = None
            _HELD.pop(self.path, None)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        if self.depth <= 0:
            self.release()


_HELD: dict[Path, FolderLock] = {}


def lock_folder(folder: str | PathLike, command: str | None = None) -> FolderLock:
    """Take ``{folder}/.lock`` for this process (creating the folder), to be released with ``with`` or
    ``release()``: a second run on the same folder is refused with :class:`FolderLocked` naming the holder
    (host, pid, command, start time), before it does any work. A lock left by a crashed run on this host is taken
    over with a one-line note; one from another host is refused with the file to delete. Re-entrant within a
    process (a job's ``main`` and its ``run`` both take it). ``command``: what the holder runs (default: argv)."""
    folder = Path(folder).resolve()
    path = folder / LOCK_FILE
    lock = _HELD.get(path)
    if lock is None:
        lock = FolderLock(folder, command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
        lock.acquire()
        _HELD[path] = lock
    lock.depth += 1
    return lock


# ---------------------------------------------------------------------------------------- caches
def error_line(e: BaseException) -> str:
    """The first line of an error's message (at most 200 characters), for one-line reports. torch's miniz
    boilerplate and its advice to load with the unsafe unpickler are dropped: a file refused on purpose must
    not come with the advice to load it anyway."""
    text = str(e).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    text = text.split(" This is an internal miniz error")[0]
    if "weights_only" in text or "Weights only" in text:
        return "it holds objects other than tensors"
    return text[:200]


def read_cache(path: str | os.PathLike, loader: Callable[[Path], T], what: str = "cache") -> T | None:
    """``loader(path)``, or None when there is no such file or it cannot be used: a damaged, truncated or
    refused cache (any error ``loader`` raises, including its own consistency checks) is treated as absent,
    with one ``warning:`` line on stderr naming it. The caller recomputes the value and writes the file again
    atomically, so a damaged cache never blocks a rerun."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles naming its unsafe loader: not for us
            warnings.filterwarnings("ignore", message=".*[Ww]eights.only")
            return loader(path)
    except Exception as e:  # damaged caches fail in many ways (unpickling, JSON, safetensors, KeyError, ...)
        print(f"warning: {what} {path} is unreadable ({type(e).__name__}: {error_line(e)}); recomputing it and "
              f"replacing the file", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------- records of our own
class DamagedFileError(RuntimeError):
    """A JSON record this project wrote about a folder (a generation plan, the identity of the model its images
    came from, a hand-over journal) cannot be read. Unlike a cache it is never treated as absent: guessing could
    mix two runs' images in one folder or lose track of images being moved. ``str()`` is one line: the file, what
    is wrong with it and what to do; the commands print it and exit with status 2."""


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _json_problem(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return "empty file" if not e.doc.strip() else f"not valid JSON: {e.msg} at line {e.lineno}"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.start})"
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return error_line(e)


def read_json(path: str | PathLike, what: str, remedy: str, kind: type = dict):
    """The JSON value of ``path``, a record this project wrote (see :class:`DamagedFileError`), which must be a
    ``kind`` (default: an object). A missing file raises ``FileNotFoundError`` (the caller knows whether that is
    fine); a damaged one (truncated, not JSON, not UTF-8, another JSON type, a folder, unreadable) raises
    :class:`DamagedFileError`: ``{what} {path} is damaged ({problem}); {remedy}``."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = _json_problem(e)
    else:
        if isinstance(value, kind):
            return value
        found, wanted = _JSON_TYPES.get(type(value), "value"), _JSON_TYPES.get(kind, kind.__name__)
        problem = f"a JSON {found} where an {wanted} was written"
    raise DamagedFileError(f"{what} {path} is damaged ({problem}); {remedy}")
