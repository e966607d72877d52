"""The attacks the job knows: ``--attack NAME`` -> (the Attack class, its Settings dataclass).

Adding an attack is one entry in :data:`ATTACKS` (its module implements :class:`attacks.base.Attack`, with a
frozen Settings dataclass of the original's defaults whose ``__post_init__`` raises ``ValueError`` on a value
that cannot work). ``tests/attacks`` checks every entry against the protocol. Two optional class facts the job
reads beyond the protocol: ``needs_pairs`` (True: the attack needs ``Concept.pairs``, e.g. Ring-A-Bell; the job
refuses a concept without them before any model is built) and the Settings' ``added_tokens`` (see
:func:`added_tokens`).
"""
from __future__ import annotations

from .inversion import ConceptInversion, InversionSettings
from .none import NoAttack, NoneSettings
from .p4d import P4DK, P4DN, P4DKSettings, P4DSettings
from .ring_a_bell import RingABell, RingABellSettings
from .unlearndiff import UnlearnDiffAtk, UnlearnDiffSettings

ATTACKS: dict[str, tuple[type, type]] = {
    NoAttack.name: (NoAttack, NoneSettings),
    RingABell.name: (RingABell, RingABellSettings),
    ConceptInversion.name: (ConceptInversion, InversionSettings),
    UnlearnDiffAtk.name: (UnlearnDiffAtk, UnlearnDiffSettings),
    P4DN.name: (P4DN, P4DSettings),
    P4DK.name: (P4DK, P4DKSettings),
}
BASELINE = NoAttack.name  # run with every attack: the pre-attack ASR


def names() -> list[str]:
    return list(ATTACKS)


def lookup(name: str) -> tuple[type, type]:
    """(Attack class, Settings class) of ``name``; ValueError naming the known attacks otherwise."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"--attack {name}: unknown attack; the attacks are: {', '.join(ATTACKS)}") from None


def _coerce(text: str, default, where: str):
    """``text`` as the type of the field's default (bool: true/false/1/0; tuples: comma-separated)."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return tuple(x.strip() for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{where}: expected {type(default).__name__}, got {text!r}") from None
    return text


def make_settings(name: str, overrides: dict[str, str] | None = None):
    """The Settings of attack ``name`` with ``overrides`` (``{field: text}``, from ``--set NAME.FIELD=VALUE``)
    converted to each field's type; ValueError (one line, naming the field) for an unknown field or a value the
    dataclass refuses."""
    import dataclasses

    _, settings_cls = lookup(name)
    fields = {f.name: f for f in dataclasses.fields(settings_cls)}
    values = {}
    for key, text in (overrides or {}).items():
        where = f"--set {name}.{key}={text}"
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ValueError(f"{where}: {name} has no setting {key!r} (its settings: {known})")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else text)
        values[key] = _coerce(text, default, where)
    try:
        return settings_cls(**values)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--set {name}.*: {e}") from None


def added_tokens(settings) -> int:
    """Prompt tokens an attack adds to the prompt (its Settings' ``added_tokens``, e.g. UnlearnDiffAtk's k; 0 if
    it has none): a prompt must leave room for them in the text encoder's 75 content tokens."""
    return int(getattr(settings, "added_tokens", 0) or 0)
