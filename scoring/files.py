"""The one place scorer files are opened: TorchScript models, weight files and CLIP folders.

Every scorer flag (``--clip_model`` / ``--mem_clip_model`` folders and ``open_clip:ARCH:FILE`` weights,
``--sscd_ckpt``, ``--feature_model``, ``--classifier``) is read through these functions, so that a corrupt,
hostile or wrong-kind file is refused the same way, before the first image is made:

* the content decides, not the name: :func:`sniff` tells a TorchScript archive from a ``torch.save`` file, a
  safetensors file, a bare pickle, a damaged zip or anything else, from the file's bytes (nothing is run);
* weight files are read by :mod:`ldm.checkpoint`'s restricted unpickler (tensors and plain containers only), so
  a pickle that would call code is refused and never unpickled;
* TorchScript is loaded with ``torch.jit.load`` only once the file is a TorchScript archive. Its loader does not
  run Python from the file, but the model's code runs when it is called: a TorchScript file is a program and
  must come from a trusted source;
* every failure is one :class:`ScorerFileError` line naming the flag, the file and what is wrong. torch's own
  messages are cut to their first line and never repeat its advice to load with the unsafe unpickler.
"""
from __future__ import annotations

import json
import os
import pickletools
import struct
import warnings
import zipfile
from pathlib import Path

import torch

__all__ = ["ScorerFileError", "sniff", "describe", "load_torchscript", "vet_torchscript", "load_state_dict",
           "vet_state_dict", "vet_clip_folder", "short_reason"]

PathLike = str | os.PathLike
_ZIP_MAGIC = b"PK\x03\x04"
# globals of a plain torch.save pickle and the inert entries ldm.checkpoint's allow-list accepts (numpy numbers,
# Lightning/omegaconf/argparse state); any other one names the code the pickle would call (used in messages only:
# what is loaded is decided by the restricted unpickler)
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "collections.defaultdict", "_codecs.encode", "builtins.set",
                   "builtins.frozenset", "builtins.dict", "builtins.list", "builtins.int", "builtins.float",
                   "builtins.str", "builtins.bool", "numpy.core.multiarray.", "numpy._core.multiarray.",
                   "numpy.dtype", "numpy.ndarray", "argparse.Namespace", "pathlib.", "typing.Any", "omegaconf.",
                   "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                   "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")


class ScorerFileError(ValueError):
    """A scorer file that cannot be used (damaged, of another kind, or a pickle that would run code); its
    message is one line: ``FLAG FILE: what is wrong``."""


def _error(flag: str, path: PathLike, what: str) -> ScorerFileError:
    return ScorerFileError(f"{flag} {path}: {what}")


def short_reason(e: BaseException) -> str:
    """The first line of an error's message without torch's advice to load with the unsafe unpickler
    (:func:`runtime.files.error_line`)."""
    from runtime.files import error_line

    return error_line(e)


# --------------------------------------------------------------------------------------------------- sniffing
def sniff(path: PathLike) -> str:
    """The kind of a file, from its bytes (nothing is unpickled or run): ``"torchscript"`` (a zip archive with
    TorchScript code), ``"torch-zip"`` (a ``torch.save`` archive), ``"zip"`` (another zip), ``"damaged-zip"``,
    ``"safetensors"``, ``"pickle"`` (a bare pickle, e.g. a legacy ``torch.save``), ``"empty"`` or ``"unknown"``."""
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        return "empty"
    with open(p, "rb") as f:
        head = f.read(9)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "damaged-zip"
        if any(n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        return "torch-zip" if any(n.endswith("/data.pkl") for n in names) else "zip"
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _pickle_code(data: bytes) -> str | None:
    """The first global a pickle would import that is not part of a plain tensor file (``module.name``), found by
    reading its opcodes (nothing is imported or run); None if there is none. A legacy ``torch.save`` file is
    several pickles in a row (magic number, protocol, system info, the object): the first few are read."""
    import io

    stream = io.BytesIO(data)
    for _ in range(4):
        if stream.tell() >= len(data):
            break
        try:
            name = _first_code_global(pickletools.genops(stream))
        except Exception:  # a damaged pickle, or the raw tensor bytes after the last one: nothing more to read
            break
        if name:
            return name
    return None


def _first_code_global(ops) -> str | None:
    recent: list = []  # values pushed lately (strings, or memo entries fetched back); enough to name a global
    memo: dict = {}
    for op, arg, _ in ops:
        name = None
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            recent.append(str(arg))
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            recent.append(memo.get(arg))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = recent[-1] if recent else None
        elif op.name in ("GLOBAL", "INST"):
            name = str(arg).replace(" ", ".")
        elif op.name == "STACK_GLOBAL":
            name = ".".join(str(x) for x in recent[-2:])
        if name is not None:
            if not name.startswith(_TENSOR_GLOBALS):
                return name
            recent.append(None)  # the global itself, in case it is memoized
    return None


def _code_in(path: Path, kind: str) -> str | None:
    """The code a pickled file (bare, or a torch.save archive's data.pkl) would call, if any."""
    try:
        if kind == "pickle":
            return _pickle_code(path.read_bytes())
        if kind == "torch-zip":
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
                return _pickle_code(z.read(name))
    except Exception:  # unreadable: the caller reports the kind
        return None
    return None


def describe(path: PathLike, kind: str | None = None) -> str:
    """What a file is, in words, for messages (``kind``: :func:`sniff`'s, computed when None)."""
    p = Path(path)
    kind = kind or sniff(p)
    code = _code_in(p, kind)
    if code:
        return f"a pickle with code ({code}): refused, nothing was loaded"
    return {"torchscript": "a TorchScript archive", "torch-zip": "a torch.save file (weights, not a program)",
            "zip": "a zip file without TorchScript code or weights", "damaged-zip": "a damaged or truncated zip file",
            "safetensors": "a safetensors weights file", "pickle": "a bare pickle", "empty": "an empty file",
            "unknown": "unrecognised content (truncated, or another format?)"}[kind]


def _existing(path: PathLike, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {p}: not found" + (" (a folder, not a file)" if p.is_dir() else ""))
    return p


# --------------------------------------------------------------------------------------------------- TorchScript
def load_torchscript(path: PathLike, flag: str, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript model in ``path`` (eval mode, on ``device``). Anything that is not an intact TorchScript
    archive is a :class:`ScorerFileError` naming ``flag`` and the file; a missing file a FileNotFoundError."""
    p = _existing(path, flag)
    kind = sniff(p)
    if kind != "torchscript":
        raise _error(flag, p, f"not a TorchScript archive: {describe(p, kind)}")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 flags TorchScript as deprecated
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, message=".*torch.jit")
            model = torch.jit.load(str(p), map_location=torch.device(device))
    except Exception as e:  # torch raises RuntimeError (miniz, unpickler) and others for damaged archives
        raise _error(flag, p, f"damaged TorchScript archive ({short_reason(e)})") from None
    return model.eval()


def vet_torchscript(path: PathLike, flag: str) -> None:
    """Load the TorchScript model in ``path`` on the CPU and drop it: every error of :func:`load_torchscript`, now."""
    load_torchscript(path, flag, "cpu")


# --------------------------------------------------------------------------------------------------- weights
def _weights(reader, path: PathLike, flag: str):
    from ldm.checkpoint import CheckpointError, UnsafeCheckpointError

    p = _existing(path, flag)
    kind = sniff(p)
    if kind not in ("safetensors", "torch-zip", "pickle"):
        raise _error(flag, p, f"not a weights file (safetensors or torch.save): {describe(p, kind)}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols, naming its unsafe loader
            warnings.filterwarnings("ignore", message=".*[Ww]eights.only.*")
            return reader(p)
    except UnsafeCheckpointError as e:
        code = e.global_name or _code_in(p, kind) or "a construct outside tensors and plain containers"
        raise _error(flag, p, f"a pickle with code ({code}): refused, nothing was loaded") from None
    except CheckpointError as e:
        text = str(e).replace(f"{p}: ", "").replace(f" {p}", "")
        raise _error(flag, p, f"unreadable weights ({short_reason(Exception(text))})") from None
    except Exception as e:  # safetensors / torch raise many types for damaged files
        raise _error(flag, p, f"unreadable weights ({short_reason(e)})") from None


def load_state_dict(path: PathLike, flag: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors, or a ``torch.save`` of a state dict, possibly under
    ``"state_dict"``), read without running any code from it; errors name ``flag`` and the file."""
    from ldm.checkpoint import file_state_dict

    return _weights(file_state_dict, path, flag)


def vet_state_dict(path: PathLike, flag: str) -> None:
    """Cheaply prove that ``path`` is a readable weights file without code: the safetensors header, or the pickle
    through the restricted unpickler with the tensor data left memory-mapped."""
    from ldm.checkpoint import file_shapes

    _weights(file_shapes, path, flag)


# --------------------------------------------------------------------------------------------------- CLIP folder
_CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # transformers' order of preference


def vet_clip_folder(path: PathLike, flag: str) -> None:
    """A transformers ``CLIPModel`` folder (``save_pretrained``): ``config.json`` of a CLIP model and the weights
    transformers would load (a single file or the shards of an index), each vetted by :func:`vet_state_dict`."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{flag} {p}: not a CLIP folder: no such folder")
    config = p / "config.json"
    if not config.is_file():
        raise _error(flag, p, "not a CLIP folder: config.json missing")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(flag, p, f"not a CLIP folder: config.json is not JSON ({short_reason(e)})") from None
    is_clip = isinstance(cfg, dict) and cfg.get("model_type", "clip") == "clip" and all(
        isinstance(cfg.get(k), dict) for k in ("text_config", "vision_config"))
    if not is_clip:
        kind = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        what = "lacks text_config or vision_config" if kind == "clip" else f"describes {kind!r}, not a CLIP model"
        raise _error(flag, p, f"not a CLIP folder: config.json {what}")
    for name in _CLIP_WEIGHTS:
        index = p / f"{name}.index.json"
        if (p / name).is_file():
            vet_state_dict(p / name, flag)
            return
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise _error(flag, p, f"unreadable {index.name} ({short_reason(e)})") from None
            for shard in shards:
                vet_state_dict(p / shard, flag)
            return
    raise _error(flag, p, f"not a CLIP folder: no weights ({' or '.join(_CLIP_WEIGHTS)})")
