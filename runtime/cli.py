"""What every entry point checks before it does any work: numbers, output locations, config values.

The scripts (``train.py``, ``sample.py``, ``evaluate.py``, ``conceptprune.py``, ``tools/export.py``)
share these rules so that a class of bad input is refused the same way everywhere:

* :class:`ArgumentParser` prints one ``error:`` line (no usage block) and exits with status 2;
* the ``type=`` functions (:func:`positive_int`, :func:`finite_float`, :func:`image_side`, :func:`guidance_scale`,
  :func:`seed_int`, :func:`comma_list`, ...) refuse non-numbers, NaN/inf, out-of-range values and empty lists
  while the command line is parsed;
* the generation limits (:data:`MAX_IMAGE_SIDE`, :data:`MAX_GUIDANCE`, :data:`SEED_LIMIT`) and their checks
  (:func:`image_side_problem`, :func:`guidance_problem`, :func:`seed_problem`) are the one definition that the
  flags, ``runtime.generate.Sampling.validate`` and the per-row settings of prompt files all apply;
* :func:`check_output` refuses an output that cannot be written (checked by creating and removing a
  probe file in the nearest existing folder, which is what counts for root too) or that is one of
  the command's inputs, before anything is generated or written;
* :func:`check_config_values` applies the same rules to ``key.sub=value`` overrides of a training
  config (``training.max_steps=abc``, ``data.size=12``, ``generation.steps=-1``).

Everything here is cheap and loads no model.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

__all__ = ["ArgumentParser", "UsageError", "parse_devices", "GPUS_HELP", "positive_int", "nonnegative_int",
           "finite_float", "nonnegative_float", "positive_float", "image_side", "guidance_scale", "seed_int",
           "comma_list", "MAX_IMAGE_SIDE", "MAX_GUIDANCE", "SEED_LIMIT", "image_side_problem", "guidance_problem",
           "seed_problem", "check_output", "check_distinct_outputs", "check_config_values", "exit_on_usage_error",
           "RunError", "run_error_status", "exit_on_run_error"]


class UsageError(ValueError):
    """A command-line value or an output location that cannot work; scripts print it and exit 2."""


class RunError(RuntimeError):
    """A bad input that shows only once the work runs (a model that samples NaN, launcher ranks that never meet):
    its message says everything, so scripts print it as one line and exit 2 (:func:`exit_on_run_error`)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in its help line."""

    def _get_help_string(self, action):
        help = action.help or ""
        # flags (store_true) and options without a default gain nothing from "(default: None/False)"
        if "%(default)" in help or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return help
        return help + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: ...`` on stderr and exit status 2, and the defaults
    shown in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        # argparse prints no help line (hence no default) for an option without help text
        if not kwargs.get("help") and kwargs.get("default") not in (None, False, argparse.SUPPRESS):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------- numbers
def _number(text: str, kind: Callable[[str], Any]):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _ranged(kind, test: Callable[[Any], bool], what: str, name: str):
    def parse(text: str):
        value = _number(text, kind)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


positive_int = _ranged(int, lambda v: v >= 1, "an integer >= 1", "positive_int")
nonnegative_int = _ranged(int, lambda v: v >= 0, "an integer >= 0", "nonnegative_int")
finite_float = _ranged(float, lambda v: True, "a finite number", "finite_float")
nonnegative_float = _ranged(float, lambda v: v >= 0, "a finite number >= 0", "nonnegative_float")
positive_float = _ranged(float, lambda v: v > 0, "a finite number > 0", "positive_float")
unit_interval = _ranged(float, lambda v: 0 <= v <= 1, "a number in [0, 1]", "unit_interval")
# ---------------------------------------------------------------------------------------- generation limits
#: SD's VAE downsamples by 8, so a side is a multiple of 8; above 4096 px (64x SD v1's latent area) a value is a
#: typo, and it would fail only once generation reaches it (out of memory) after other images were made.
MAX_IMAGE_SIDE = 4096
#: Guidance scales in use lie within a few tens; beyond, fp16/fp32 sampling overflows (1e308 gives NaN images).
MAX_GUIDANCE = 100.0
#: Seeds are drawn by ``torch.Generator.manual_seed``, which takes [-2**63, 2**64); the generator of our images
#: (``runtime.generate``) keeps the non-negative int64 range, so every seed is an int in [0, 2**63).
SEED_LIMIT = 2 ** 63


def image_side_problem(value) -> str | None:
    """None when ``value`` is an image side SD can make (an int, a multiple of 8, 8..MAX_IMAGE_SIDE); else what
    it must be."""
    ok = not isinstance(value, bool) and isinstance(value, int) and 8 <= value <= MAX_IMAGE_SIDE and value % 8 == 0
    return None if ok else f"a multiple of 8 from 8 to {MAX_IMAGE_SIDE}"


def guidance_problem(value) -> str | None:
    """None when ``value`` is a finite guidance scale with ``|value| <= MAX_GUIDANCE``; else what it must be."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and abs(value) <= MAX_GUIDANCE
    return None if ok else f"a finite number from {-MAX_GUIDANCE:g} to {MAX_GUIDANCE:g}"


def seed_problem(value) -> str | None:
    """None when ``value`` is an integer seed in [0, SEED_LIMIT); else what it must be."""
    ok = not isinstance(value, bool) and isinstance(value, int) and 0 <= value < SEED_LIMIT
    return None if ok else "an integer from 0 to 2**63-1"


def _within(problem: Callable[[Any], str | None], kind, name: str):
    def parse(text: str):
        value = _number(text, kind)
        want = problem(value)
        if want:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


image_side = _within(image_side_problem, int, "image_side")
guidance_scale = _within(guidance_problem, float, "guidance_scale")
seed_int = _within(seed_problem, int, "seed_int")


def comma_list(text: str) -> list[str]:
    """A comma-separated flag value as its items, each stripped; stray empty items (``"a,,b"``, ``"a,"``) are
    dropped, but a value with no item at all (``""``, ``",,"``) is an error, never "use the default"."""
    items = [c.strip() for c in str(text).split(",") if c.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of at least one item, got {text!r}")
    return items


# ---------------------------------------------------------------------------------------- devices
GPUS_HELP = ("devices, one process each: CUDA ids '0,1', or 'cpu:N' for N CPU processes (the same multi-process "
             "code path, on gloo); default: one device (cuda if available, else cpu)")


def parse_devices(spec: str | None, default: str | None = None) -> tuple[str, ...]:
    """``--gpus``: ``"0,1"`` -> ``("cuda:0", "cuda:1")``, ``"cpu:2"`` -> ``("cpu", "cpu")``, ``"cpu"`` ->
    ``("cpu",)``; None -> ``(default,)`` (default: cuda if available, else cpu). Raises UsageError."""
    import torch

    if spec is None:
        return (default or ("cuda" if torch.cuda.is_available() else "cpu"),)
    text = str(spec).replace(" ", "").strip(",")
    if text == "cpu" or text.startswith("cpu:"):
        n = text[4:] or "1"
        if not n.isdigit() or int(n) < 1:
            raise UsageError(f"--gpus {spec}: 'cpu:N' needs a process count N >= 1")
        return ("cpu",) * int(n)
    parts = text.split(",")
    if not text or not all(p.isdigit() for p in parts):
        raise UsageError(f"--gpus {spec}: expected CUDA ids such as 0,1 or cpu:N")
    ids = [int(p) for p in parts]
    if len(set(ids)) != len(ids):
        raise UsageError(f"--gpus {spec}: a device is listed twice")
    if not torch.cuda.is_available():
        raise UsageError(f"--gpus {spec} given but CUDA is not available on this machine (use cpu:N for CPU "
                         f"processes)")
    if max(ids) >= torch.cuda.device_count():
        raise UsageError(f"--gpus {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return tuple(f"cuda:{i}" for i in ids)


# ---------------------------------------------------------------------------------------- outputs
def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _probe_dir(folder: Path, what: str) -> None:
    """Raise UsageError unless a file can be created in ``folder`` (an existing directory)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
    except OSError as e:
        raise UsageError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def check_output(path: str | os.PathLike | None, what: str, *, kind: str = "file",
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path | None:
    """Refuse an output location before any work: ``kind`` "file" or "dir" (a folder the command writes in).

    The nearest existing folder on the path must accept a new file (a probe file is created and removed;
    nothing else is written, no folder is created), nothing on the path may be a file where a folder is
    needed, and a file output may not be one of ``inputs`` (it would overwrite what it reads).
    Returns ``path`` as a Path (None stays None).
    """
    if path is None:
        return None
    p = Path(path).expanduser()
    if str(path).strip() == "":
        raise UsageError(f"{what} is empty")
    if kind == "file":
        if p.is_dir():
            raise UsageError(f"{what} {p} is a directory, not a file")
        for src in inputs:
            if src is not None and _same_path(p, Path(src)):
                raise UsageError(f"{what} {p} is also an input of this command ({src}); writing it would "
                                 f"overwrite the input: choose another output path")
    elif p.exists() and not p.is_dir():
        raise UsageError(f"{what} {p} exists and is not a directory")
    folder = p if (kind == "dir" and p.is_dir()) else p.parent
    while not folder.exists():
        if folder.parent == folder:
            break
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{what} {p}: {folder} is a file, not a directory")
    _probe_dir(folder, f"{what} {p}")
    return p


def check_distinct_outputs(outputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse two outputs of one command that name the same file."""
    named = [(what, Path(p)) for what, p in outputs.items() if p is not None]
    for i, (wa, a) in enumerate(named):
        for wb, b in named[i + 1:]:
            if _same_path(a, b):
                raise UsageError(f"{wa} and {wb} are the same path ({a})")


# ---------------------------------------------------------------------------------------- configs
def _int_rule(low: int, multiple: int = 1):
    want = f"an integer >= {low}" + (f" and a multiple of {multiple}" if multiple > 1 else "")

    def check(v):
        ok = not isinstance(v, bool) and isinstance(v, int) and v >= low and v % multiple == 0
        return None if ok else want
    return check


def _float_rule(low: float | None = None, high: float | None = None, strict_low: bool = False):
    def check(v):
        want = "a finite number"
        if low is not None:
            want += f" {'>' if strict_low else '>='} {low:g}"
        if high is not None:
            want += f" and <= {high:g}"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return want
        if low is not None and (v <= low if strict_low else v < low):
            return want
        if high is not None and v > high:
            return want
        return None
    return check


# key -> rule; keys absent from a config are not checked (each concept type has its own set)
CONFIG_RULES: dict[str, Callable[[Any], str | None]] = {
    "training.max_steps": _int_rule(1),
    "training.batch_size": _int_rule(1),
    "training.save_freq": _int_rule(0),
    "training.num_workers": _int_rule(0),
    "training.base_learning_rate": _float_rule(0, strict_low=True),
    "training.weight_decay": _float_rule(0),
    "training.regularization_weight": _float_rule(0),
    "training.preservation_weight": _float_rule(0, strict_low=True),
    "data.size": _int_rule(8, multiple=8),
    "data.flip_p": _float_rule(0, 1),
    "generation.steps": _int_rule(1),
    "generation.check_steps": _int_rule(1),
    "generation.check_images_per_prompt": _int_rule(1),
    "generation.anchor_size": _int_rule(1),
    "generation.target_size": _int_rule(1),
    "generation.eta": _float_rule(0),
    "generation.scale": _float_rule(),
    "generation.seed": _int_rule(0),
    "generation.sampler": lambda v: (None if v in ("ddim", "plms", "dpmpp_2m", "lms")
                                     else "one of ddim, plms, dpmpp_2m, lms"),
    "generation.sscd_threshold": _float_rule(-1, 1),
    "logging.image_every": _int_rule(0),
    "logging.image_steps": _int_rule(1),
}


def check_config_values(config, rules: Mapping[str, Callable[[Any], str | None]] = CONFIG_RULES) -> None:
    """Raise UsageError for the first config value that breaks its rule (``OmegaConf`` node or dict: both
    are Mappings)."""
    for key, rule in rules.items():
        value = _select(config, key)
        if value is None:
            continue
        want = rule(value)
        if want:
            raise UsageError(f"config value {key}={value!r}: must be {want}")


def _select(d: Mapping, key: str):
    for part in key.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return None
        d = d[part]
    return d


# ---------------------------------------------------------------------------------------- scripts
def exit_on_usage_error(fn: Callable[[], Any]) -> Any:
    """Run a script's cheap setup ``fn``; a bad input becomes one ``error:`` line and exit status 2."""
    # UsageError is a ValueError, CheckpointError a RuntimeError, a missing file an OSError
    caught = (ValueError, OSError, RuntimeError, ImportError)
    try:
        return fn()
    except caught as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_error_status(e: BaseException) -> int | None:
    """The exit status of an error found during a job's work whose message says everything, so that it is printed
    as one line: 2 for a bad input (a :class:`RunError`; a model file found broken while it is loaded,
    ``CheckpointError``, e.g. a NaN/inf weight: the up-front checks read headers only; a damaged record of a
    folder, ``runtime.files.DamagedFileError``), 1 for a file that cannot be written (``runtime.files.WriteError``:
    disk full, no permission). None for any other error, which keeps its traceback. The one list of these classes:
    :func:`exit_on_run_error` and the worker processes of ``runtime.generate`` both use it."""
    from ldm.checkpoint import CheckpointError
    from runtime.files import DamagedFileError, WriteError

    if isinstance(e, WriteError):
        return 1
    if isinstance(e, (RunError, CheckpointError, DamagedFileError)):
        return 2
    return None


def exit_on_run_error(fn: Callable[[], Any]) -> Any:
    """Run a script's work ``fn``; an error whose message says everything (:func:`run_error_status`: a bad input
    found only during the work, status 2; a file it cannot write, status 1) becomes one ``error:`` line and that
    exit status. Other errors keep their traceback."""
    try:
        return fn()
    except Exception as e:
        status = run_error_status(e)
        if status is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(status)
