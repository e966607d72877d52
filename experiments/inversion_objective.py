"""Why concept inversion fails on the toy world: its objective, read directly.

Concept inversion (``attacks.inversion``) learns a token by minimising the model's denoising loss on images of the
concept, with the token in the original's caption templates. That only finds the concept if the concept's own
word gives a lower loss than other words. This study measures the objective for the concept's word and for other
words (the initializer "art", the world's other concepts and styles), on the same images, with the same draws of
t, noise and posterior sample for every word (common random numbers), so the paired difference to the concept's
word is measured far more precisely than either loss alone. ::

    python -m experiments.inversion_objective --concept stripes --targets DIR [--base CKPT] [--repeats 40] [--json F]

``--targets``: a folder of PNG images of the concept (e.g. the attack job's ``targets/<key>/cfg7.5`` folder, the
base model's generations of the concept prompts). ``--words``: the words compared (default: the initializer and
the toy world's textures and styles). Results: docs/experiments/toy-attacks.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from toyworld.mission import ASSETS, asset_paths

DEFAULT_WORDS = ("art", "painting", "stripes", "checkerboard", "polka dots", "waves", "grumpy cat", "cat")


def load_images(folder: Path) -> np.ndarray:
    """uint8 [N, H, W, 3]: every PNG under ``folder`` in name order (ValueError when there is none)."""
    from PIL import Image

    paths = sorted(Path(folder).rglob("*.png"))
    if not paths:
        raise ValueError(f"--targets {folder}: no PNG images")
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def load_token(item: str) -> tuple[str, torch.Tensor]:
    """``NAME=FILE`` -> (name, vectors [k, D]) from concept inversion's kept ``prepared-*.safetensors``; a
    ValueError that names the item for anything else (no ``=``, no file, not safetensors, no 2-D ``vectors``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name, sep, file = item.partition("=")
    if not sep or not name or not Path(file).is_file():
        raise ValueError(f"--token {item}: expected NAME=FILE, an existing prepared-*.safetensors")
    try:
        state = load_file(file)
    except SafetensorError as e:
        raise ValueError(f"--token {item}: not a safetensors file ({e})") from None
    vectors = state.get("vectors")
    if vectors is None or vectors.ndim != 2 or not vectors.is_floating_point():
        raise ValueError(f"--token {item}: no float 'vectors' [k, D] in it (keys: {', '.join(sorted(state))})")
    return name, vectors


PLACEHOLDER = "<learned>"


@torch.no_grad()
def objective(model, images: np.ndarray, words, learnable_property: str = "style", repeats: int = 40,
              seed: int = 0, captions: list[str] | None = None, templates: tuple[str, ...] | None = None,
              tokens: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """word -> the inversion loss of every (repeat, template) draw: ``images`` (uint8 [N, H, W, 3]) as one batch,
    each caption the property's template ``j`` (or ``templates``' ``j``) holding the word, draw (rep, j) seeded
    ``seed + 1000 rep + j`` for every word alike (the same t, noise and posterior sample). ``captions``: instead
    of the templates, image i's own caption with ``{}`` where the word goes (one draw per repeat). ``tokens``:
    learned embeddings ({name: vectors [k, D]}, e.g. concept inversion's kept token) measured like words."""
    from attacks.inversion import (
        TEMPLATES,
        denoising_loss,
        encode_with_token,
        model_images,
        placeholder_template,
        posteriors,
    )

    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    groups = ([captions] if captions is not None
              else [[t] * len(images) for t in (templates or TEMPLATES[learnable_property])])
    tokens = tokens or {}
    encoder = model.cond_stage_model

    def condition(name, texts):
        if name not in tokens:
            return model.get_learned_conditioning([t.replace("{}", name) for t in texts])
        vectors = tokens[name]
        framed = [placeholder_template(encoder, t.replace("{}", PLACEHOLDER), PLACEHOLDER, vectors.shape[0])
                  for t in texts]
        return encode_with_token(encoder, framed, vectors.float())

    mean, std = posteriors(model, model_images(images, "cpu", torch.float32))
    names = [*words, *tokens]
    out = {w: [] for w in names}
    for rep in range(repeats):
        for j, texts in enumerate(groups):
            for w in names:
                cond = condition(w, texts)
                g = torch.Generator().manual_seed(seed + 1000 * rep + j)
                out[w].append(float(denoising_loss(model, cond, mean[0], std[0], g)))
    return {w: np.asarray(v) for w, v in out.items()}


def paired_table(losses: dict[str, np.ndarray], concept: str) -> list[dict]:
    """Per word: mean loss and the paired difference to ``concept``'s word, mean +- standard error."""
    ref = losses[concept]
    rows = []
    for w, v in losses.items():
        d = v - ref
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        rows.append({"word": w, "loss": float(v.mean()), "minus_concept": float(d.mean()), "se": se, "n": len(d)})
    return sorted(rows, key=lambda r: r["loss"])


def main(argv=None) -> list[dict]:
    from runtime.cli import exit_on_usage_error

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", required=True, help="the concept's word (the reference of the differences)")
    p.add_argument("--targets", required=True, type=Path, help="folder of PNG images of the concept")
    p.add_argument("--base", type=Path, default=asset_paths(ASSETS)["weights"],
                   help="the toy model (for waves: the waves-taught base, experiments.attack_study's base_waves)")
    p.add_argument("--words", nargs="+", default=None, help="words compared (default: %(default)s)")
    p.add_argument("--learnable_property", default="style", choices=("object", "style", "person"))
    p.add_argument("--captions", type=Path, default=None,
                   help="instead of the templates: a text file, line i image i's caption with {} for the word")
    p.add_argument("--templates", choices=("original", "world"), default="original",
                   help="the original's templates of --learnable_property, or the toy world's grammar "
                        "(experiments.attack_study.WORLD_TEMPLATES)")
    p.add_argument("--token", action="append", default=[], metavar="NAME=FILE",
                   help="a learned token measured like a word: concept inversion's kept prepared-*.safetensors")
    p.add_argument("--repeats", type=int, default=40, help="draws per template")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    a = p.parse_args(argv)

    def go():
        from attacks.text import token_embedding_matrix
        from ldm.util import load_model_config
        from runtime.loading import load_model

        if a.repeats < 2:
            raise ValueError(f"--repeats {a.repeats}: must be >= 2 (a standard error needs two draws)")
        if not a.base.is_file():
            raise ValueError(f"--base {a.base}: no such file")
        images = load_images(a.targets)  # before the model: a bad folder costs nothing
        words = list(dict.fromkeys([a.concept, *(a.words or DEFAULT_WORDS)]))
        captions = None
        if a.captions:
            from runtime.files import read_prompts

            captions = read_prompts(a.captions)
            if len(captions) != len(images) or any("{}" not in c for c in captions):
                raise ValueError(f"--captions {a.captions}: needs one line per image ({len(images)}), each with {{}}")
        loaded = [(item, *load_token(item)) for item in a.token]
        tokens = {name: vectors for _, name, vectors in loaded}
        if len(tokens) != len(loaded) or set(tokens) & set(words):
            raise ValueError("--token: each NAME once, and none of the --words")
        templates = None
        if a.templates == "world":
            from experiments.attack_study import WORLD_TEMPLATES

            templates = WORLD_TEMPLATES[a.learnable_property]
        torch.manual_seed(0)
        model = load_model(load_model_config(asset_paths(ASSETS)["config"]), a.base)
        width = token_embedding_matrix(model.cond_stage_model).shape[1]
        for item, _, vectors in loaded:
            if vectors.shape[1] != width:
                raise ValueError(f"--token {item}: vectors of width {vectors.shape[1]}, the model's text encoder "
                                 f"has {width}")
        rows = paired_table(objective(model.eval(), images, words, a.learnable_property, a.repeats,
                                     captions=captions, templates=templates, tokens=tokens), a.concept)
        how = f"captions {a.captions}" if captions else f"{a.templates} {a.learnable_property} templates"
        print(f"{len(images)} images of {a.concept!r}, {how}, n = {rows[0]['n']} draws")
        print("| word | inversion loss | minus the concept's word |\n|---|---|---|")
        for r in rows:
            print(f"| {r['word']} | {r['loss']:.4f} | {r['minus_concept']:+.4f} ± {r['se']:.4f} |")
        if a.json:
            from runtime.files import write_text_atomic

            doc = {"concept": a.concept, "targets": str(a.targets), "base": str(a.base), "images": len(images),
                   "learnable_property": a.learnable_property, "repeats": a.repeats,
                   "captions": str(a.captions) if a.captions else None, "templates": a.templates,
                   "tokens": {n: f for n, _, f in (t.partition("=") for t in a.token)}, "rows": rows}
            write_text_atomic(a.json, json.dumps(doc, indent=1) + "\n")
        return rows

    return exit_on_usage_error(go)


if __name__ == "__main__":
    main()
