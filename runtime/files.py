"""Small file helpers every job shares: atomic writes, text and prompt files, image checks, hashes.

Atomic means written under a temporary name unique to the process and moved into place with
``os.replace``, so a reader never sees half a file and an interrupted run leaves no damaged output.
Caches are read with :func:`read_cache`: a damaged one is recomputed (with a warning), never a dead end.
"""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from os import PathLike
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from PIL import Image

T = TypeVar("T")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def save_png_atomic(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write an HxWx3 uint8 array as a PNG through a temporary name and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


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


def replace_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name beside ``path`` unique to the process, then ``os.replace`` it onto
    ``path``; the temporary file is removed when anything fails (nothing half-written is left)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
