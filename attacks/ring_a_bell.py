"""Ring-A-Bell (Tsai et al., ICLR 2024; chiayi-hsu/Ring-A-Bell): a black-box, model-agnostic prompt attack.

It needs only the text encoder (here the attacked model's ``cond_stage_model``; the original used SD v1.4's
CLIP ViT-L/14, which every SD-v1 erasure keeps). Facts of the original (``Get_Concept_Vector.ipynb``,
``InversePrompt.ipynb``) that this module keeps:

* **concept vector**: the mean over prompt pairs (with, without the concept) of the difference of their
  text-encoder ``last_hidden_state`` - the whole [77, D] tensor, not a pooled vector. (The notebook repeats
  each prompt 5 times, which leaves the mean unchanged, and drops the nudity pairs whose images NudeNet did not
  flag: curating the pairs is the caller's part, :attr:`Concept.pairs`.)
* **target**: ``encode(prompt) + eta * concept_vector``.
* **genetic search** over token ids ``[BOS, L free tokens, EOS x (76 - L)]``, free tokens drawn uniformly from
  ids ``1 .. BOS-1`` (never 0 or the two special ids). Each generation: fitness of every member = the *summed*
  squared difference between its [77, D] embedding and the target (lower is better); sort; keep the better
  half; unless it is the last generation: crossover (each kept parent stays; with probability
  ``crossover_rate`` it is paired with a uniformly drawn kept parent at a cut point in ``1..L`` and both
  children are added), then mutation (each member, parents included, with probability ``mutate_rate`` gets one
  free position set to a random id). There is no elitism in the original: the best parent itself may be
  mutated, so the best fitness can rise between generations (``elite`` > 0 protects the best parents).
* **result**: the best member of the last generation, decoded (its L free tokens) to a text prompt - the text
  is what the original hands on for generation, so that is what is checked here (``check_on="ids"`` checks
  the exact token ids instead: decoding and re-tokenizing need not give back the same ids).

Defaults are the notebook's (population 200, 3000 generations, mutation 0.25, crossover 0.5, L=16, eta=3,
used for nudity); :data:`CONCEPT_DEFAULTS` holds the per-concept values the original states.

Speed: the whole population goes through the text encoder in one batched call per generation (chunks of
``batch_size``), and members that did not change since they were scored keep their score (the encoder is
deterministic), so only the new children and mutated members are encoded. The search reads nothing but the text
encoder, so models that share it (every erasure that edits only the UNet: Concept Ablation, ConceptPrune, ...)
make the same search for a prompt: given a folder (:meth:`RingABell.share`; the attack job gives one per
concept), a search is kept there under a digest of everything it depends on and reused by the next model,
which then only checks the found prompt on itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from .base import AttackResult, Checker, Concept
from .text import decode, encode_ids, tokenize

# Per-concept (length L, eta) the original states: nudity is the notebook's default (K=16, eta=3); violence is
# the released inverse-prompt file Violence_eta_5.5_K_77 (K=77 content: L=75, as the notebook says).
CONCEPT_DEFAULTS: dict[str, dict[str, float | int]] = {
    "nudity": {"length": 16, "eta": 3.0},
    "violence": {"length": 75, "eta": 5.5},
}


@dataclass(frozen=True)
class RingABellSettings:
    """The genetic search of ``InversePrompt.ipynb`` (its defaults).

    ``length``: free tokens L (the paper's K counts them: K=77 means L=75). ``eta``: strength of the concept
    vector in the target. ``elite``: best parents kept unmutated each generation (0: the original).
    ``check_on``: "text" (the decoded prompt, re-tokenized: the original's output), "ids" (the found ids), or
    "target" (ours, a diagnostic, not an attack: the continuous target ``encode(prompt) + eta * vector`` itself
    as the conditioning, no search; it tells a concept direction that does not bring the concept back from a
    search that does not reach a direction that does). ``batch_size``: members per text-encoder call (0: the
    whole population at once)."""

    length: int = 16
    eta: float = 3.0
    population: int = 200
    generations: int = 3000
    mutate_rate: float = 0.25
    crossover_rate: float = 0.5
    elite: int = 0
    check_on: str = "text"
    batch_size: int = 0

    def __post_init__(self):
        if not 1 <= self.length <= 75:
            raise ValueError(f"length {self.length}: must be 1..75 (77 positions less BOS and one EOS)")
        if self.population < 2 or self.population % 2:
            raise ValueError(f"population {self.population}: must be an even number >= 2 (half survives)")
        if self.generations < 1:
            raise ValueError(f"generations {self.generations}: must be >= 1")
        for name in ("mutate_rate", "crossover_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)}: must be in [0, 1]")
        if not 0 <= self.elite <= self.population // 2:
            raise ValueError(f"elite {self.elite}: must be 0..population/2")
        if self.check_on not in ("text", "ids", "target"):
            raise ValueError(f"check_on {self.check_on!r}: must be 'text', 'ids' or 'target'")
        if self.batch_size < 0:
            raise ValueError(f"batch_size {self.batch_size}: must be >= 0")


# ---------------------------------------------------------------------------------------- pieces
def encoder_of(model):
    """The text encoder of a CompVis model (``cond_stage_model``) or the encoder itself."""
    return getattr(model, "cond_stage_model", model)


@torch.no_grad()
def encode_batched(encoder, ids: torch.Tensor, batch_size: int = 0) -> torch.Tensor:
    """``encode_ids`` of ids [B, 77] in chunks of ``batch_size`` rows (0: one call): [B, 77, D] float32."""
    ids = ids.to(encoder.device)
    step = batch_size or ids.shape[0]
    return torch.cat([encode_ids(encoder, ids[i:i + step]).float() for i in range(0, ids.shape[0], step)])


@torch.no_grad()
def concept_vector(encoder, pairs, batch_size: int = 64) -> torch.Tensor:
    """Mean over ``pairs`` ((with, without) prompts) of ``encode(with) - encode(without)``: [77, D] float32."""
    if not pairs:
        raise ValueError("Ring-A-Bell needs prompt pairs (with, without the concept) for its concept vector")
    diff = (encode_batched(encoder, tokenize(encoder, [p[0] for p in pairs]), batch_size)
            - encode_batched(encoder, tokenize(encoder, [p[1] for p in pairs]), batch_size))
    return diff.mean(dim=0).cpu()


def fitness(embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed squared difference of each [77, D] embedding to ``target`` (the original's loss; lower is better)."""
    return ((target.to(embeddings) - embeddings) ** 2).sum(dim=(1, 2))


def initial_population(n: int, length: int, bos: int, eos: int, generator: torch.Generator,
                       max_length: int = 77) -> torch.Tensor:
    """[n, max_length] ids: BOS, ``length`` ids uniform in 1..bos-1, then EOS to the end."""
    ids = torch.full((n, max_length), eos, dtype=torch.long)
    ids[:, 0] = bos
    ids[:, 1:length + 1] = torch.randint(1, bos, (n, length), generator=generator)
    return ids


def crossover(parents: torch.Tensor, rate: float, length: int, generator: torch.Generator):
    """The original's crossover: every parent stays, in order; with probability ``rate`` it is followed by the
    two children of a cut with a uniformly drawn parent (cut point in 1..length). Returns (population, parent
    rank of each row or -1 for a child)."""
    n = parents.shape[0]
    crossed = torch.rand(n, generator=generator) < rate
    mates = torch.randint(0, n, (n,), generator=generator)
    cuts = torch.randint(1, length + 1, (n,), generator=generator)
    head = torch.arange(parents.shape[1])[None, :] < cuts[:, None]  # [n, 77]: positions before the cut
    mate = parents[mates]
    child_a = torch.where(head, parents, mate)  # this parent's head, the mate's tail
    child_b = torch.where(head, mate, parents)
    rows = torch.stack([parents, child_a, child_b], dim=1)  # [n, 3, 77]: parent, then its children
    keep = torch.stack([torch.ones(n, dtype=torch.bool), crossed, crossed], dim=1)
    rank = torch.stack([torch.arange(n), torch.full((n,), -1), torch.full((n,), -1)], dim=1)
    return rows[keep], rank[keep]


def mutate(population: torch.Tensor, rate: float, length: int, high: int, generator: torch.Generator,
           frozen: torch.Tensor | None = None) -> torch.Tensor:
    """The original's mutation: each row, with probability ``rate``, gets one position in 1..length set to an
    id uniform in 1..high-1. Rows where ``frozen`` is True are left alone. Returns the mask of mutated rows
    (``population`` is changed in place)."""
    n = population.shape[0]
    hit = torch.rand(n, generator=generator) < rate
    where = torch.randint(1, length + 1, (n,), generator=generator)
    values = torch.randint(1, high, (n,), generator=generator)
    if frozen is not None:
        hit &= ~frozen
    rows = hit.nonzero().flatten()
    population[rows, where[rows]] = values[rows]
    return hit


def encoder_fingerprint(encoder) -> str:
    """A digest of the text encoder's parameters and buffers (names, dtypes, shapes, bytes) and its device type:
    two models with the same digest make the same searches."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in [*encoder.named_parameters(), *encoder.named_buffers()]:
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.device.type};".encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def search_key(fingerprint: str, target: torch.Tensor, settings: RingABellSettings,
               generator: torch.Generator) -> str:
    """What one search depends on: the encoder, the target (the prompt, eta and the concept vector in it), the
    search's settings (not ``check_on``, which only says what is checked afterwards) and the generator's state."""
    h = hashlib.blake2b(digest_size=12)
    facts = {k: v for k, v in dataclasses.asdict(settings).items() if k != "check_on"}
    h.update(json.dumps({"encoder": fingerprint, "settings": facts}, sort_keys=True).encode())
    h.update(target.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(generator.get_state().numpy().tobytes())
    return h.hexdigest()


def genetic_search(encoder, target: torch.Tensor, settings: RingABellSettings, generator: torch.Generator,
                   progress: Callable[[int, float], None] | None = None):
    """Run the search towards ``target`` [77, D]. Returns (best ids [77], best loss per generation, best loss
    of the returned ids)."""
    s, tok = settings, encoder.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    population = initial_population(s.population, s.length, bos, eos, generator, encoder.max_length)
    scores = torch.full((s.population,), float("nan"))
    stale = torch.ones(s.population, dtype=torch.bool)  # rows whose score must be (re)computed
    losses: list[float] = []
    for step in range(s.generations):
        if stale.any():
            scores[stale] = fitness(encode_batched(encoder, population[stale], s.batch_size), target).cpu()
        order = torch.sort(scores, stable=True).indices[: s.population // 2]
        population, scores = population[order], scores[order]
        losses.append(float(scores[0]))
        if progress is not None:
            progress(step, losses[-1])
        if step == s.generations - 1:
            break
        population, rank = crossover(population, s.crossover_rate, s.length, generator)
        parent_scores = scores
        frozen = (rank >= 0) & (rank < s.elite)
        mutated = mutate(population, s.mutate_rate, s.length, bos, generator, frozen)
        stale = (rank < 0) | mutated
        scores = torch.where(rank >= 0, parent_scores[rank.clamp_min(0)], torch.tensor(float("nan")))
    return population[0].clone(), losses, float(scores[0])


# ---------------------------------------------------------------------------------------- the attack
class RingABell:
    """Ring-A-Bell: concept vector once per (model, concept), then one genetic search per prompt."""

    name: ClassVar[str] = "ring_a_bell"
    needs_base: ClassVar[bool] = False
    needs_targets: ClassVar[bool] = False
    needs_pairs: ClassVar[bool] = True  # the concept vector comes from Concept.pairs

    def __init__(self, settings: RingABellSettings | None = None):
        self.settings = settings or RingABellSettings()
        self.vector: torch.Tensor | None = None
        self.searches: Path | None = None
        self.fingerprint: str | None = None

    def share(self, folder: str | Path) -> None:
        """Keep each search in ``folder`` and reuse the searches found there (see the module's Speed note)."""
        self.searches = Path(folder)

    def prepare(self, model, concept: Concept) -> None:
        """The concept vector from ``concept.pairs`` through the model's text encoder (and, when searches are
        shared, the encoder's fingerprint)."""
        encoder = encoder_of(model)
        self.vector = concept_vector(encoder, concept.pairs)
        self.fingerprint = encoder_fingerprint(encoder) if self.searches is not None else None

    def _search(self, encoder, target: torch.Tensor, generator: torch.Generator, progress):
        """(ids, losses, best, facts): the genetic search, or the kept one with the same key."""
        from runtime.files import read_cache, write_text_atomic

        s = self.settings
        if self.searches is None:
            return (*genetic_search(encoder, target, s, generator, progress), {})
        if self.fingerprint is None:  # share() came after prepare(): never key a search without its encoder
            self.fingerprint = encoder_fingerprint(encoder)
        path = self.searches / f"{search_key(self.fingerprint, target, s, generator)}.json"
        kept = read_cache(path, lambda p: json.loads(p.read_text()), "a kept Ring-A-Bell search")
        if kept is not None and len(kept["ids"]) == encoder.max_length and len(kept["losses"]) == s.generations:
            return (torch.tensor(kept["ids"]), kept["losses"], float(kept["best"]),
                    {"search": "shared", "search_seconds": kept["seconds"], "search_file": path.name})
        start = time.perf_counter()
        ids, losses, best = genetic_search(encoder, target, s, generator, progress)
        seconds = round(time.perf_counter() - start, 3)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"ids": ids.tolist(), "losses": losses, "best": best,
                                            "seconds": seconds}) + "\n")
        return ids, losses, best, {"search": "made", "search_seconds": seconds, "search_file": path.name}

    def attack(self, model, prompt: str, *, concept: Concept, check: Checker, index: int, base=None,
               generator: torch.Generator | None = None,
               progress: Callable[[int, float], None] | None = None) -> AttackResult:
        """Search for a prompt whose embedding is near ``encode(prompt) + eta * vector``; check the final one."""
        if self.vector is None:
            raise RuntimeError("RingABell.prepare(model, concept) must run before attack()")
        s, encoder = self.settings, encoder_of(model)
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        target = encode_batched(encoder, tokenize(encoder, prompt))[0].cpu() + s.eta * self.vector
        if s.check_on == "target":  # the diagnostic: the search's aim itself, no search
            with torch.no_grad():
                like = model.get_learned_conditioning([prompt])  # the device and dtype of a prompt's conditioning
            result = check(target[None].to(like), 0)
            return AttackResult(prompt=prompt, success=result.success, first_success=0 if result.success else None,
                                losses=[], images=[result.image], extra={"checked_on": "target", "eta": s.eta})
        ids, losses, best, how = self._search(encoder, target, generator, progress)
        text = decode(encoder, ids[1:s.length + 1])
        retokenized = tokenize(encoder, text)[0].cpu()
        with torch.no_grad():
            cond = (model.get_learned_conditioning([text]) if s.check_on == "text"
                    else encode_ids(encoder, ids[None].to(encoder.device)))
        step = s.generations - 1  # the original generates from the final prompt only
        result = check(cond, step)
        return AttackResult(
            prompt=text, success=result.success, first_success=step if result.success else None,
            losses=losses, images=[result.image],
            extra={"token_ids": ids[1:s.length + 1].tolist(), "best_loss": best,
                   "retokenizes_exactly": bool(torch.equal(retokenized, ids)), "checked_on": s.check_on, **how})
