"""A tiny CLIP trained contrastively on toy-world (render, caption) pairs.

The text tower is meant to become the diffusion model's ``FrozenCLIPEmbedder`` (``text_state_dict_for_ldm``
plus ``ldm_text_config``); the whole model is what ``scoring.metrics.load_clip(dir)`` loads as "CLIP" for
the evaluation (``save_pretrained`` layout, safetensors).

Consistency with ``scoring.metrics``:

* images go through ``scoring.metrics.preprocess_clip`` (short-side bicubic resize to
  ``vision_config.image_size``, centre crop, CLIP mean/std);
* texts are tokenized with our CLIP BPE tokenizer (BOS 49406, EOS = pad 49407) and the text feature is
  pooled at the FIRST EOS (``text_features``), then projected - what ``metrics`` does; the config's
  ``eos_token_id`` is 49407 so transformers' own pooling picks the same token.

Because the text transformer is causal, the hidden state at the first EOS does not depend on the tokens
after it; training therefore cuts each batch after its longest caption (identical features and gradients,
fewer positions). Positions after the first EOS get no gradient from the contrastive loss either way.

CLI::

    python -m toyworld.clip --out assets/toyworld/clip --steps 3000 --batch_size 128 --size 32
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .dataset import DEFAULT_MIXTURE, Mixture, iter_samples
from .render import ANCHOR_STYLE, CAT_CLASSES, COLOUR_NAMES, SHAPES, SUBJECTS, TEXTURES

__all__ = ["tiny_clip_config", "ldm_text_config", "text_state_dict_for_ldm", "encode_texts", "text_features",
           "image_features", "clip_loss", "train_clip", "zero_shot_accuracy", "zero_shot_prompts", "EVAL_SEED"]

EOS_TOKEN_ID = 49407
BOS_TOKEN_ID = 49406
EVAL_SEED = 10_007  # renders for zero-shot evaluation; training uses other seeds by default
LDM_PREFIX = "cond_stage_model.transformer.text_model."


# ---------------------------------------------------------------------------------------- config
def tiny_clip_config(image_size: int = 32, patch_size: int | None = None, text_hidden: int = 64,
                     text_layers: int = 3, vision_hidden: int = 64, vision_layers: int = 3, heads: int = 4,
                     projection_dim: int = 64):
    """A small ``CLIPConfig``: CLIP-BPE text tower (vocab 49408, 77 positions, quick_gelu, EOS 49407) and a
    ViT image tower (``patch_size`` 4 for 32 px, 8 for 64 px by default, i.e. 8x8 patches)."""
    from transformers import CLIPConfig

    if patch_size is None:
        patch_size = 4 if image_size <= 32 else 8
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    text = dict(vocab_size=49408, hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=heads, max_position_embeddings=77,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
                projection_dim=projection_dim, pad_token_id=EOS_TOKEN_ID, bos_token_id=BOS_TOKEN_ID,
                eos_token_id=EOS_TOKEN_ID)
    vision = dict(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size, num_channels=3,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
                  projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim,
                      logit_scale_init_value=math.log(1 / 0.07))


_LDM_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                  "pad_token_id", "bos_token_id", "eos_token_id")


def ldm_text_config(clip_config) -> dict:
    """The ``text_config`` overrides for ``FrozenCLIPEmbedder`` (and the LDM yaml) matching ``clip_config``."""
    tc = clip_config.text_config if hasattr(clip_config, "text_config") else clip_config
    return {k: getattr(tc, k) for k in _LDM_TEXT_KEYS}


def text_state_dict_for_ldm(clip_model, prefix: str = LDM_PREFIX) -> dict:
    """The text tower's weights under ``cond_stage_model.transformer.text_model.*`` (plus ``position_ids``),
    as a LatentDiffusion (or, with ``prefix="transformer.text_model."``, a ``FrozenCLIPEmbedder``) expects."""
    tm = clip_model.text_model
    sd = {prefix + k: v.detach().clone() for k, v in tm.state_dict().items()}
    n = int(tm.config.max_position_embeddings)
    sd[prefix + "embeddings.position_ids"] = torch.arange(n, dtype=torch.long)[None]
    return sd


# ---------------------------------------------------------------------------------------- features
def _tokenizer():
    from ldm.modules.encoders.clip_tokenizer import default_tokenizer

    return default_tokenizer()


def encode_texts(texts, tokenizer=None, max_length: int = 77, trim: bool = True) -> torch.Tensor:
    """Token ids ``[B, L]`` (BOS, BPE, EOS, EOS padding). ``trim`` cuts the columns after the last first-EOS
    (harmless for first-EOS pooling in a causal model)."""
    tok = tokenizer if tokenizer is not None else _tokenizer()
    ids = tok(list(texts), max_length=max_length)
    if trim:
        last = int((ids == tok.eos_token_id).int().argmax(dim=1).max())
        ids = ids[:, :last + 1]
    return ids


def text_features(model, ids: torch.Tensor, eos_token_id: int = EOS_TOKEN_ID) -> torch.Tensor:
    """Projected (unnormalised) text embeddings pooled at the first ``eos_token_id`` (as ``scoring.metrics``)."""
    hidden = model.text_model(input_ids=ids).last_hidden_state
    pos = (ids == eos_token_id).int().argmax(dim=1)
    return model.text_projection(hidden[torch.arange(ids.shape[0], device=hidden.device), pos])


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (unnormalised) image embeddings."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


def preprocess_images(images, size: int) -> torch.Tensor:
    from scoring.metrics import preprocess_clip

    return torch.stack([preprocess_clip(im, size) for im in images])


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image, text) embeddings."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = logit_scale.exp() * img @ txt.T
    labels = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# ---------------------------------------------------------------------------------------- training
class _Batches:
    """Batches of (pixel_values, captions): streamed from ``iter_samples`` (fresh renders) or, with ``pool``,
    drawn from ``pool`` pre-rendered items (faster on a CPU; the renderer costs ~3 ms per 32 px image)."""

    def __init__(self, seed: int, size: int, image_size: int, batch_size: int, pool: int, mixture: Mixture):
        self.batch_size, self.image_size = batch_size, image_size
        self.pool = pool
        if pool:
            items = list(iter_samples(seed, size, mixture, 0, pool))
            self.pixels = preprocess_images([im for im, _, _ in items], image_size)
            self.captions = [c for _, c, _ in items]
            self.gen = torch.Generator().manual_seed(seed)
            self.order, self.cursor = torch.randperm(pool, generator=self.gen), 0
        else:
            self.stream = iter_samples(seed, size, mixture)

    def next(self):
        if not self.pool:
            items = [next(self.stream) for _ in range(self.batch_size)]
            return preprocess_images([im for im, _, _ in items], self.image_size), [c for _, c, _ in items]
        if self.cursor + self.batch_size > self.pool:
            self.order, self.cursor = torch.randperm(self.pool, generator=self.gen), 0
        idx = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.pixels[idx], [self.captions[i] for i in idx.tolist()]


def _lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _save_curve(outdir: Path, history: list[dict]) -> None:
    (outdir / "loss.json").write_text(json.dumps(history, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the dev requirements
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("toy-world CLIP")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(outdir / "loss.png", dpi=100)
    plt.close(fig)


def train_clip(outdir, steps: int = 1000, batch_size: int = 128, lr: float = 5e-4, seed: int = 0,
               size: int = 32, log_every: int = 50, *, config=None, pool: int = 0, warmup: int | None = None,
               schedule: str = "cosine", weight_decay: float = 0.1, mixture: Mixture = DEFAULT_MIXTURE,
               progress: bool = True, save: bool = True):
    """Train a tiny CLIP on toy-world renders of ``size`` px (seed ``seed``) and ``save_pretrained`` it to
    ``outdir`` with ``loss.json`` / ``loss.png`` / ``train.json``. Returns ``(model, history)``, ``history``
    a list of ``{"step", "loss", "lr", "logit_scale"}`` (one per ``log_every`` steps, plus the first and
    last step)."""
    from tqdm.auto import tqdm
    from transformers import CLIPModel

    if steps < 1 or batch_size < 2:
        raise ValueError("need steps >= 1 and batch_size >= 2")
    if seed == EVAL_SEED:
        raise ValueError(f"seed {EVAL_SEED} is reserved for zero-shot evaluation")
    torch.manual_seed(seed)
    random.seed(seed)
    config = config if config is not None else tiny_clip_config(image_size=size)
    model = CLIPModel(config).train()
    image_size = int(config.vision_config.image_size)
    tok = _tokenizer()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = min(100, steps // 10) if warmup is None else warmup
    data = _Batches(seed, size, image_size, batch_size, pool, mixture)
    history, t0 = [], time.time()
    bar = tqdm(range(steps), desc="clip", disable=not progress)
    for step in bar:
        cur = _lr_at(step, steps, lr, warmup, schedule)
        for g in opt.param_groups:
            g["lr"] = cur
        pixels, captions = data.next()
        ids = encode_texts(captions, tok)
        loss = clip_loss(image_features(model, pixels), text_features(model, ids, tok.eos_token_id),
                         model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "loss": loss.item(), "lr": cur,
                            "logit_scale": model.logit_scale.detach().exp().item(),
                            "time_s": round(time.time() - t0, 2)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    model.eval()
    with torch.no_grad():  # the saved file is fp16: make the returned model (and its evaluation) match it
        for p in model.parameters():
            p.copy_(p.half().float())
    if save:
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        save_half(model, out)
        _save_curve(out, history)
        meta = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "size": size, "pool": pool,
                "warmup": warmup, "schedule": schedule, "weight_decay": weight_decay,
                "train_time_s": round(time.time() - t0, 1), "final_loss": history[-1]["loss"],
                "ldm_text_config": ldm_text_config(config)}
        (out / "train.json").write_text(json.dumps(meta, indent=2) + "\n")
    return model, history


def save_half(model, outdir) -> None:
    """``save_pretrained`` with fp16 weights (half the size; ``scoring.metrics.load_clip`` loads fp32)."""
    model.half().save_pretrained(outdir, safe_serialization=True)
    model.float()


# ---------------------------------------------------------------------------------------- zero-shot
def zero_shot_prompts() -> dict[str, dict[str, list[list[str]]]]:
    """Per family, per class: groups of prompts; each group's mean (normalised) embedding is one prototype
    of the class, and an image gets the class of its most similar prototype.

    The attribute under test varies; the others are filled with every vocabulary value and averaged
    (prompt ensembling), so no single filler biases a class. Textured objects get their own prototypes
    (one group per texture): a texture changes how a shape or colour looks at 32 px as much as the
    caption's wording does, and one averaged prototype would sit between the two looks.

    * ``shape``: the 6 shapes and 4 cat classes, ``"a photo of a {colour} {subject}"`` plus, for the 6
      shapes, ``"a painting of a {colour} {shape} in the style of {texture}"`` per texture;
    * ``cat``: the 4 cat classes only (the instance vs anchor vs hard negatives);
    * ``colour``: ``"a photo of a {colour} {subject}"`` averaged over subjects, plus one group per texture;
    * ``style``: ``"a painting of a {colour} {shape} in the style of {texture}"`` for the 3 textures and
      ``"a painting of a {colour} {shape}"`` for the anchor "painting" (plain fill), averaged over
      colours and shapes (one group each).
    """
    def art(w):
        return ("an " if w[0] in "aeiou" else "a ") + w

    def styled(c, s, t):
        return f"a painting of {art(c + ' ' + s)} in the style of {t}"

    subj = {s: [[f"a photo of {art(c + ' ' + s)}" for c in COLOUR_NAMES]] for s in SUBJECTS}
    shape = {s: g + ([[styled(c, s, t) for c in COLOUR_NAMES] for t in TEXTURES] if s in SHAPES else [])
             for s, g in subj.items()}
    colour = {c: [[f"a photo of {art(c + ' ' + s)}" for s in SUBJECTS]] +
              [[styled(c, s, t) for s in SHAPES] for t in TEXTURES] for c in COLOUR_NAMES}
    style = {ANCHOR_STYLE: [[f"a painting of {art(c + ' ' + s)}" for c in COLOUR_NAMES for s in SHAPES]]}
    for t in TEXTURES:
        style[t] = [[styled(c, s, t) for c in COLOUR_NAMES for s in SHAPES]]
    return {"shape": shape, "cat": {s: subj[s] for s in CAT_CLASSES}, "colour": colour, "style": style}


def _label_of(family: str, label: dict) -> str | None:
    """The ground-truth class of an item for ``family`` (None: the item does not take part)."""
    if label["memorized"]:
        return None
    if family == "shape":
        return label["subject"]
    if family == "cat":
        return label["subject"] if label["subject"] in CAT_CLASSES else None
    if family == "colour":
        return label["colour"]
    if family == "style":
        return label["style"] if label["shape"] in SHAPES else None
    raise KeyError(family)


@torch.no_grad()
def zero_shot_accuracy(model, n: int = 500, seed: int = EVAL_SEED, size: int = 32, mixture: Mixture = DEFAULT_MIXTURE,
                       return_counts: bool = False):
    """Zero-shot accuracy per attribute family (``shape``, ``cat``, ``colour``, ``style``) on ``n`` fresh renders
    (data-set seed ``seed``): each image gets the class of its most similar ensembled prompt embedding
    (``zero_shot_prompts``).
    Memorized pictures are skipped; ``style`` uses non-cat items, ``cat`` cat items only. A family with no
    item gets ``nan``. With ``return_counts`` also returns ``{family: number of items}``."""
    from scoring.metrics import clip_image_features, clip_text_features

    was_training = model.training
    model.eval()
    items = list(iter_samples(seed, size, mixture, 0, n))
    img = clip_image_features(model, [im for im, _, _ in items], batch_size=128)
    acc, counts = {}, {}
    for family, classes in zero_shot_prompts().items():
        names = list(classes)
        protos = [(k, F.normalize(clip_text_features(model, g).mean(0), dim=0))
                  for k, c in enumerate(names) for g in classes[c]]
        owner = torch.tensor([k for k, _ in protos])
        emb = torch.stack([e for _, e in protos])
        rows = [(i, names.index(y)) for i, (_, _, lab) in enumerate(items)
                if (y := _label_of(family, lab)) is not None]
        counts[family] = len(rows)
        if not rows:
            acc[family] = float("nan")
            continue
        idx = torch.tensor([r[0] for r in rows])
        truth = torch.tensor([r[1] for r in rows])
        pred = owner[(img[idx] @ emb.T).argmax(dim=1)]
        acc[family] = float((pred == truth).float().mean())
    model.train(was_training)
    return (acc, counts) if return_counts else acc


# ---------------------------------------------------------------------------------------- CLI
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Train a tiny CLIP on the toy world and report zero-shot accuracy.")
    p.add_argument("--out", default="assets/toyworld/clip")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32, help="render size (px); also the ViT image_size")
    p.add_argument("--pool", type=int, default=0, help="pre-render this many items and sample from them (0: stream)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--eval_n", type=int, default=1000, help="fresh renders for the zero-shot report (0: skip)")
    p.add_argument("--eval_seed", type=int, default=EVAL_SEED)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, history = train_clip(args.out, args.steps, args.batch_size, args.lr, args.seed, args.size, args.log_every,
                                pool=args.pool, warmup=args.warmup, schedule=args.schedule)
    report = {"steps": args.steps, "final_loss": history[-1]["loss"], "train_time_s": history[-1]["time_s"]}
    if args.eval_n:
        acc, counts = zero_shot_accuracy(model, args.eval_n, args.eval_seed, args.size, return_counts=True)
        chance = {f: 1 / len(c) for f, c in zero_shot_prompts().items()}
        report.update(zero_shot=acc, counts=counts, chance=chance)
        (Path(args.out) / "zero_shot.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
