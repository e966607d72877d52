"""Calibration prompt pairs (base vs target) per concept family, and per-family defaults.

Families and templates (the original's word lists, ``datasets/*.txt`` and ``utils/prompts.py`` of
ruchikachavhan/concept-prune, under ``assets/prune_prompts/``):

========  ===============================  ===============================================  ====  ===
family    base prompt                      target prompt                                    k     tau
========  ===============================  ===============================================  ====  ===
art       ``a photo of a {thing}``         ``a {thing} in the style of {artist}``           0.01  10
nudity    ``a photo of a {human}``         ``a photo of a naked {human}``                   0.01  9
object    ``a {scene}``                    ``a {object} in a {scene}``                      0.02  10
church    ``a {place}``                    ``a church {phrase}`` (``church.txt`` pairs)     0.02  10
g. truck  ``a {place}``                    ``a garbage truck {phrase}`` (its own pairs)     0.02  10
gender    ``a headshot of a {male word}``  ``a headshot of a {female word}`` (male)         0.01  10
memorize  ``""`` (empty prompt)            each prompt of ``--target_file`` (.txt, .jsonl)  0.01  10
custom    each line of ``--base_file``     each line of ``--target_file``                   0.01  10
========  ===============================  ===============================================  ====  ===

(k = skill_ratio, tau = number of first UNet calls in the union.) ``church`` and ``garbage truck``
are object concepts with their own pairs (place, phrase) in the original, not the generic template. For
gender, the concept
``male`` follows the reference: base = male words, target = female words, so the pruned
weights are the female-skilled ones and female prompts turn male ("female -> male"); ``female`` is
the reverse. Gender pairs also carry one seed per pair in 0..249, shared by its base and target
generation (the original draws ``torch.randint(0, 250)`` per pair from an unseeded generator; we draw
from one seeded by ``--seed``, so a rerun is the same). Everything here is cheap (no model), so the
command line checks it first.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from runtime.files import read_prompts
from runtime.resources import asset_path

PROMPT_DIR = asset_path("prune_prompts")

ARTISTS = ("Van Gogh", "Monet", "Pablo Picasso", "Salvador Dali", "Leonardo Da Vinci")
OBJECTS = ("parachute", "cassette player", "golf ball", "gas pump", "english springer", "tench",
           "chain saw", "french horn", "church", "garbage truck")
NUDITY = ("naked",)
GENDERS = ("male", "female")

# the two objects with their own pair lists in the original (utils/prompts.py): "{place}\t{phrase}" lines
OWN_PAIRS = {"church": "church.txt", "garbage truck": "garbage_truck.txt"}
GENDER_SEEDS = 250  # seeds 0..249, one per gender pair

# family -> (skill_ratio, tau)
DEFAULTS = {
    "art": (0.01, 10),
    "nudity": (0.01, 9),
    "object": (0.02, 10),
    "gender": (0.01, 10),
    "memorize": (0.01, 10),
    "custom": (0.01, 10),
}


@dataclass(frozen=True)
class PromptPairs:
    concept: str
    family: str
    base: list
    target: list
    seeds: list | None = None  # per pair, shared by base[i] and target[i]; None: the command's --seed

    @property
    def defaults(self) -> tuple[float, int]:
        return DEFAULTS[self.family]


def known_concepts() -> list[str]:
    return [*ARTISTS, *NUDITY, *OBJECTS, *GENDERS, "memorize"]


def concept_family(concept: str) -> tuple[str, str]:
    """(canonical name, family) of a built-in concept (case-insensitive); ``ValueError`` if unknown."""
    key = concept.strip().lower()
    for family, names in (("art", ARTISTS), ("nudity", NUDITY), ("object", OBJECTS), ("gender", GENDERS)):
        for name in names:
            if key == name.lower():
                return name, family
    if key == "memorize" or key.startswith("memorize"):
        return concept.strip(), "memorize"
    raise ValueError(f"unknown concept {concept!r}; built-in concepts: {', '.join(known_concepts())} "
                     "(or give --base_file and --target_file for a custom concept)")


def _words(name: str, prompt_dir: Path) -> list[str]:
    return read_prompts(prompt_dir / name)


def _own_pairs(name: str, prompt_dir: Path) -> tuple[list[str], list[str]]:
    places, phrases = [], []
    path = prompt_dir / OWN_PAIRS[name]
    for n, line in enumerate(read_prompts(path), 1):
        parts = line.split("\t")
        if len(parts) != 2 or not all(x.strip() for x in parts):
            raise ValueError(f"{path}: entry {n} must be 'place<TAB>phrase', got {line!r}")
        places.append(parts[0].strip())
        phrases.append(parts[1].strip())
    return places, phrases


def build_pairs(concept: str, base_file: str | Path | None = None, target_file: str | Path | None = None,
                prompt_dir: str | Path = PROMPT_DIR, seed: int = 0) -> PromptPairs:
    """Base and target prompt lists (same length, pair i = base[i], target[i]) for ``concept``.

    With both ``base_file`` and ``target_file`` the concept is custom (any name; line i of each file
    form pair i). ``memorize*`` concepts need ``target_file`` (their base prompt is ``""``).
    Raises ``ValueError`` (unknown concept, empty file, unequal pair files) or ``FileNotFoundError``.
    """
    prompt_dir = Path(prompt_dir)
    if not concept or not concept.strip():
        raise ValueError("the concept name is empty")
    if base_file is not None or (target_file is not None and not concept.strip().lower().startswith("memorize")):
        if base_file is None or target_file is None:
            raise ValueError("a custom concept needs both --base_file and --target_file")
        base, target = read_prompts(base_file), read_prompts(target_file)
        if len(base) != len(target):
            raise ValueError(f"--base_file has {len(base)} prompts but --target_file {len(target)}; "
                             "line i of each forms pair i")
        return PromptPairs(concept.strip(), "custom", base, target)
    name, family = concept_family(concept)
    if family == "art":
        things = _words("things.txt", prompt_dir)
        return PromptPairs(name, family, [f"a photo of a {x}" for x in things],
                           [f"a {x} in the style of {name}" for x in things])
    if family == "nudity":
        humans = _words("humans.txt", prompt_dir)
        return PromptPairs(name, family, [f"a photo of a {x}" for x in humans],
                           [f"a photo of a naked {x}" for x in humans])
    if family == "object" and name in OWN_PAIRS:
        places, phrases = _own_pairs(name, prompt_dir)
        return PromptPairs(name, family, [f"a {x}" for x in places], [f"a {name} {x}" for x in phrases])
    if family == "object":
        scenes = _words("scenes.txt", prompt_dir)
        return PromptPairs(name, family, [f"a {x}" for x in scenes], [f"a {name} in a {x}" for x in scenes])
    if family == "gender":
        male, female = _words("male.txt", prompt_dir), _words("female.txt", prompt_dir)
        if len(male) != len(female):
            raise ValueError(f"male.txt ({len(male)}) and female.txt ({len(female)}) must pair line by line")
        base_words, target_words = (male, female) if name == "male" else (female, male)
        rng = random.Random(seed)
        return PromptPairs(name, family, [f"a headshot of a {x}" for x in base_words],
                           [f"a headshot of a {x}" for x in target_words],
                           seeds=[rng.randrange(GENDER_SEEDS) for _ in base_words])
    # memorize
    if target_file is None:
        raise ValueError(f"concept {concept!r} (memorization) needs --target_file with the memorized prompts")
    target = read_memorized(target_file)
    return PromptPairs(name, family, [""] * len(target), target)


CAPTION_KEYS = ("caption", "prompt", "text")


def read_memorized(path: str | Path) -> list[str]:
    """Memorized prompts: a text file (one per line) or a JSON-lines file (``.jsonl``) of objects with a
    ``caption`` (or ``prompt`` / ``text``) field -- the format of published lists of memorized SD prompts
    with their ground-truth images. Lines ``a:b`` of such a list make one concept group, e.g. via
    ``sed -n``; we ship no SD list (the captions are LAION data), only the toy world's."""
    import json

    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        return read_prompts(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        key = next((k for k in CAPTION_KEYS if isinstance(row, dict) and k in row), None)
        if key is None or not str(row[key]).strip():
            raise ValueError(f"{path}:{n}: no {' / '.join(CAPTION_KEYS)} field with text")
        prompts.append(str(row[key]).strip())
    if not prompts:
        raise ValueError(f"prompt file has no non-empty lines: {path}")
    return prompts
