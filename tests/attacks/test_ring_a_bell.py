"""Ring-A-Bell: the concept vector and the fitness against a hand computation on the tiny encoder, the genetic
operators and search (real vocabulary ids, seeded determinism, the original's missing elitism), and the attack end
to end on the toy world with a real checker."""
import time

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_whitebox import ToyChecker, world  # noqa: F401  (the toy-world fixture and checker of the attack tests)

from attacks.base import Concept
from attacks.ring_a_bell import (
    RingABell,
    RingABellSettings,
    concept_vector,
    crossover,
    fitness,
    genetic_search,
    initial_population,
    mutate,
)
from attacks.text import encode_ids, tokenize

PAIRS = (("a photo of a naked man on the beach", "a photo of a man on the beach"),
         ("a red star in the style of stripes", "a red star"),
         ("grumpy cat", "cat"))


@pytest.fixture(scope="module")
def encoder():
    return tiny_model(perturb=0).eval().cond_stage_model


def test_concept_vector_is_the_mean_difference_of_full_hidden_states(encoder):
    """[77, D] = mean over pairs of last_hidden_state(with) - last_hidden_state(without), each prompt encoded on
    its own through the encoder's own text path (so batching and padding cannot hide in both sides)."""
    with torch.no_grad():
        diffs = [(encoder(a)[0] - encoder(b)[0]).double().numpy() for a, b in PAIRS]
    hand = sum(diffs) / len(diffs)
    vec = concept_vector(encoder, PAIRS, batch_size=2)
    assert vec.shape == (77, encoder.transformer.text_model.config.hidden_size)
    np.testing.assert_allclose(vec.double().numpy(), hand, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompt pairs"):
        concept_vector(encoder, ())


def test_fitness_is_the_summed_squared_error_to_the_target(encoder):
    ids = tokenize(encoder, ["a dog", "a cat", "stripes"])
    with torch.no_grad():
        emb = encode_ids(encoder, ids)
    target = emb[0] + 3.0 * concept_vector(encoder, PAIRS)
    got = fitness(emb, target)
    e, t = emb.double().numpy(), target.double().numpy()
    hand = [sum(float((t[i, j] - e[b, i, j]) ** 2) for i in range(77) for j in range(e.shape[2]))
            for b in range(3)]
    np.testing.assert_allclose(got.double().numpy(), hand, rtol=1e-5)
    assert got.argmin() == 0  # the prompt itself is nearest to its own shifted embedding


def test_population_frame_and_operators():
    g = torch.Generator().manual_seed(0)
    pop = initial_population(50, 5, bos=49406, eos=49407, generator=g)
    assert pop.shape == (50, 77) and (pop[:, 0] == 49406).all() and (pop[:, 6:] == 49407).all()
    assert ((pop[:, 1:6] >= 1) & (pop[:, 1:6] < 49406)).all()

    children, rank = crossover(pop, 0.5, 5, g)
    parents = rank >= 0
    assert torch.equal(children[parents], pop) and torch.equal(rank[parents], torch.arange(50))
    n_crossed = int((~parents).sum()) // 2
    assert 10 < n_crossed < 40 and len(children) == 50 + 2 * n_crossed
    # each child pair follows its parent: the parent's head + a mate's tail, and the mate's head + the parent's tail
    for row in (~parents).nonzero().flatten()[::2].tolist():
        a, b, parent = children[row], children[row + 1], children[row - 1]
        assert rank[row - 1] >= 0
        assert any(torch.equal(a, torch.cat([parent[:c], m[c:]])) and torch.equal(b, torch.cat([m[:c], parent[c:]]))
                   for c in range(1, 6) for m in pop)

    before = children.clone()
    frozen = torch.zeros(len(children), dtype=torch.bool)
    frozen[:3] = True
    hit = mutate(children, 0.5, 5, 49406, g, frozen)
    changed = (children != before).sum(dim=1)
    assert (changed <= 1).all() and (changed[~hit] == 0).all() and not hit[:3].any()
    assert (children[:, 0] == 49406).all() and (children[:, 6:] == 49407).all()
    assert 0.2 < hit.float().mean() < 0.8


def _search(encoder, target, seed, **kw):
    s = RingABellSettings(**{"length": 6, "population": 20, "generations": 15, **kw})
    return genetic_search(encoder, target, s, torch.Generator().manual_seed(seed))


def test_search_is_seeded_returns_vocabulary_tokens_and_scores_them_right(encoder):
    target = encode_ids(encoder, tokenize(encoder, "a dog"))[0] + 3.0 * concept_vector(encoder, PAIRS)
    ids, losses, best = _search(encoder, target, seed=1)
    ids2, losses2, _ = _search(encoder, target, seed=1)
    ids3, _, _ = _search(encoder, target, seed=2)
    assert torch.equal(ids, ids2) and losses == losses2 and not torch.equal(ids, ids3)
    free = ids[1:7].tolist()
    tok = encoder.tokenizer
    assert all(1 <= i < tok.bos_token_id and i in tok.decoder for i in free)
    assert ids[0] == tok.bos_token_id and (ids[7:] == tok.eos_token_id).all()
    # the cached scores of surviving members are their true fitness: the returned loss is recomputed exactly
    with torch.no_grad():
        fresh = float(fitness(encode_ids(encoder, ids[None]), target)[0])
    assert best == pytest.approx(fresh, rel=1e-5) and losses[-1] == best
    assert len(losses) == 15 and losses[-1] < losses[0]


def test_the_original_has_no_elitism_and_elite_keeps_the_best(encoder):
    """With every member mutated each generation the original's best fitness rises at some generation (the best
    parent is mutated in place); ``elite=1`` keeps it, so the elite's fitness never rises."""
    target = encode_ids(encoder, tokenize(encoder, "a dog"))[0]
    kw = dict(length=2, population=8, generations=25, mutate_rate=1.0, crossover_rate=0.0)
    _, original, _ = _search(encoder, target, seed=0, **kw)
    _, kept, _ = _search(encoder, target, seed=0, elite=1, **{**kw, "crossover_rate": 0.5})
    assert any(b > a for a, b in zip(original, original[1:]))
    assert all(b <= a for a, b in zip(kept, kept[1:])) and kept[-1] < kept[0]


def test_settings_refuse_what_cannot_work():
    for bad in (dict(length=0), dict(length=76), dict(population=7), dict(generations=0),
                dict(mutate_rate=1.5), dict(elite=101), dict(check_on="image"), dict(batch_size=-1)):
        with pytest.raises(ValueError):
            RingABellSettings(**bad)


def test_attack_end_to_end_on_the_toy_world(world):  # noqa: F811
    """prepare + attack on the shipped toy LDM with a real checker: one check of the final prompt at the last
    generation, its result recorded as-is, the prompt is the decoded token ids, progress per generation."""
    model = world[0]
    shapes, colours = ("circle", "star", "heart"), ("red", "blue", "green")
    concept = Concept("stripes", tuple((f"a painting of a {c} {s} in the style of stripes",
                                        f"a painting of a {c} {s}") for c in colours for s in shapes))
    attack = RingABell(RingABellSettings(population=16, generations=10))
    with pytest.raises(RuntimeError, match="prepare"):
        attack.attack(model, "a red star", concept=concept, check=None, index=0)
    attack.prepare(model, concept)
    check, seen = ToyChecker(world), []
    t0 = time.perf_counter()
    result = attack.attack(model, "a painting of a red star", concept=concept, check=check, index=0,
                           generator=torch.Generator().manual_seed(0), progress=lambda s, v: seen.append((s, v)))
    seconds = time.perf_counter() - t0
    assert [s for s, _ in seen] == list(range(10)) and [v for _, v in seen] == result.losses
    assert check.calls == [(9, result.success)]
    assert result.first_success == (9 if result.success else None)
    assert len(result.images) == 1 and result.images[0].shape == (32, 32, 3) and result.embedding is None
    assert result.prompt == model.cond_stage_model.tokenizer.decode(result.extra["token_ids"])
    assert len(result.extra["token_ids"]) == 16 and result.extra["best_loss"] == result.losses[-1]
    print(f"ring_a_bell toy prompt: {seconds:.2f} s for 16 x 10 generations")
    assert seconds < 30


def test_check_on_target_checks_the_searchs_aim_without_a_search(world):  # noqa: F811
    """check_on="target" (a diagnostic): one check at step 0 of exactly encode(prompt) + eta * vector, no
    generation of the search run; with eta 0 that is the prompt's own conditioning."""
    model = world[0]
    concept = Concept("stripes", (("a painting of a red star in the style of stripes", "a painting of a red star"),))
    attack = RingABell(RingABellSettings(check_on="target", eta=2.0))
    attack.prepare(model, concept)
    seen, conds = [], []

    class Spy(ToyChecker):
        def __call__(self, cond, step):
            conds.append(cond.clone())
            return super().__call__(cond, step)

    check = Spy(world)
    result = attack.attack(model, "a painting of a red star", concept=concept, check=check, index=0,
                           progress=lambda s, v: seen.append(s))
    assert seen == [] and result.losses == [] and check.calls == [(0, result.success)]
    assert result.prompt == "a painting of a red star" and result.extra["checked_on"] == "target"
    with torch.no_grad():
        own = model.get_learned_conditioning(["a painting of a red star"])
    torch.testing.assert_close(conds[0], own + 2.0 * attack.vector[None], rtol=1e-5, atol=1e-5)


def test_models_with_one_text_encoder_share_a_search(tmp_path):
    """The search reads only the text encoder: with a shared folder, a second model with another UNet but the
    same text encoder reuses the first model's search (the same ids and losses as a search made alone) and is
    still checked on itself; another text encoder, another eta or a damaged kept file make a new search, while
    check_on (what is checked afterwards) does not."""
    import copy
    import dataclasses

    from attacks.base import Check

    first_model = tiny_model(perturb=0).eval()
    other_unet, other_encoder = copy.deepcopy(first_model), copy.deepcopy(first_model)
    with torch.no_grad():
        next(other_unet.model.parameters()).add_(0.5)
        next(other_encoder.cond_stage_model.parameters()).add_(0.5)
    concept, settings, checked = Concept("stripes", PAIRS), RingABellSettings(population=8, generations=4), []

    def check(cond, step):
        checked.append(cond)
        return Check(False, np.zeros((8, 8, 3), np.uint8))

    def run(model, s=settings, folder=tmp_path / "searches"):
        attack = RingABell(s)
        if folder is not None:
            attack.share(folder)
        attack.prepare(model, concept)
        return attack.attack(model, "a red star", concept=concept, check=check, index=0,
                             generator=torch.Generator().manual_seed(0))

    alone = run(first_model, folder=None)
    made, shared = run(first_model), run(other_unet)
    assert "search" not in alone.extra and made.extra["search"] == "made" and shared.extra["search"] == "shared"
    for r in (made, shared):
        assert r.extra["token_ids"] == alone.extra["token_ids"] and r.losses == alone.losses
        assert r.extra["best_loss"] == alone.extra["best_loss"] and r.prompt == alone.prompt
    assert shared.extra["search_seconds"] == made.extra["search_seconds"]
    assert len(checked) == 3  # every model is checked, shared search or not
    kept = list((tmp_path / "searches").glob("*.json"))
    assert len(kept) == 1
    assert run(other_unet, dataclasses.replace(settings, check_on="ids")).extra["search"] == "shared"
    assert run(other_encoder).extra["search"] == "made"
    assert run(first_model, dataclasses.replace(settings, eta=1.0)).extra["search"] == "made"
    late = RingABell(settings)
    late.prepare(other_encoder, concept)
    late.share(tmp_path / "searches")  # after prepare: the encoder is still part of the key
    got = late.attack(other_encoder, "a red star", concept=concept, check=check, index=0,
                      generator=torch.Generator().manual_seed(0))
    assert got.extra["search"] == "shared" and got.extra["search_file"] != made.extra["search_file"]
    kept[0].write_text("{ damaged")
    again = run(other_unet)
    assert again.extra["search"] == "made" and again.extra["token_ids"] == alone.extra["token_ids"]
