"""Concept inversion: the placeholder prompt layout, the training (only the new token moves, the model's denoising
loss on the concept's images falls, seeded), the learned token changes generations, and the attack end to end on
the toy world with a real checker."""
import time

import numpy as np
import pytest
import torch
from test_whitebox import ToyChecker, world  # noqa: F401  (the toy-world fixture and checker of the attack tests)

from attacks.base import Concept
from attacks.inversion import (
    STYLE_TEMPLATES,
    ConceptInversion,
    InversionSettings,
    attack_prompt,
    denoising_loss,
    encode_with_token,
    initial_vectors,
    learn_token,
    placeholder_template,
    posteriors,
)
from attacks.text import content_ids, encode_ids, token_embedding_matrix, tokenize

PH = "<art-style>"


@pytest.fixture(scope="module")
def images():
    """12 ground-truth renders of the concept (stripes) at the toy model's generation size."""
    from toyworld.render import Scene, render

    return np.stack([np.asarray(render(Scene(shape=s, colour=c, style="stripes"), 32).convert("RGB"))
                     for s in ("circle", "star", "heart", "square") for c in ("red", "blue", "green")])


def test_placeholder_prompt_encodes_like_a_real_word(world):  # noqa: F811
    """With a vocabulary word's embedding in the slot, the prompt encodes exactly as the prompt with that word."""
    model = world[0]
    enc = model.cond_stage_model
    template = placeholder_template(enc, f"a painting of a red star in the style of {PH}", PH)
    word = content_ids(enc, "stripes")
    assert len(word) == 1 and template.k == 1
    vec = token_embedding_matrix(enc)[word].clone()
    with torch.no_grad():
        got = encode_with_token(enc, [template], vec)
        want = encode_ids(enc, tokenize(enc, "a painting of a red star in the style of stripes"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    two = placeholder_template(enc, f"{PH} and {PH}", PH, k=2)
    assert two.slots.tolist() == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="does not hold"):
        placeholder_template(enc, "a painting", PH)
    with pytest.raises(ValueError, match="longer than"):
        placeholder_template(enc, "word " * 80 + PH, PH)


def test_attack_prompt_replaces_the_concept_or_uses_the_first_template():
    assert attack_prompt("A star in the style of Stripes", "stripes", PH, "style") == (
        f"A star in the style of {PH}", "replaced")
    assert attack_prompt("a red star", "stripes", PH, "style") == (STYLE_TEMPLATES[0].format(PH), "template")
    assert attack_prompt("a red star", "grumpy cat", PH, "object")[0] == f"a photo of a {PH}"


def test_settings_refuse_what_cannot_work():
    for bad in (dict(learnable_property="texture"), dict(steps=0), dict(batch_size=0), dict(placeholder="{x}"),
                dict(learning_rate=0.0), dict(flip_p=2.0)):
        with pytest.raises(ValueError):
            InversionSettings(**bad)
    assert InversionSettings().lr == pytest.approx(5e-3 * 16)  # --scale_lr: x batch 4 x accumulation 4
    assert InversionSettings(scale_lr=False).lr == 5e-3


def test_own_templates_replace_the_originals_in_training_and_prompts(world, images):  # noqa: F811
    """``templates``: checked (one {} each), read from ``--set`` as a comma list, used for the training captions
    (the same seed learns another token than with the style list) and for prompts that do not name the concept;
    empty keeps the original's list."""
    from attacks.registry import make_settings

    for bad in (("no slot",), ("{} and {}",), ("{x} {}",), ("{} }",)):
        with pytest.raises(ValueError, match="exactly one"):
            InversionSettings(templates=bad)
    s = make_settings("inversion", {"templates": "{} style, in the style of {}"})
    assert s.templates == ("{} style", "in the style of {}") and s.caption_templates == s.templates
    assert InversionSettings().caption_templates == STYLE_TEMPLATES
    assert InversionSettings(templates=["{} style"]).templates == ("{} style",)  # a list from Python, hashable
    assert attack_prompt("a red star", "stripes", PH, "style", s.templates) == (f"{PH} style", "template")
    assert attack_prompt("stripes on a star", "stripes", PH, "style", s.templates)[1] == "replaced"

    short = dict(steps=2, batch_size=2, grad_accum=1)
    model = world[0]
    original = learn_token(model, images, InversionSettings(**short))[0]
    own = learn_token(model, images, InversionSettings(**short, templates=s.templates))[0]
    assert not torch.equal(original, own)
    with pytest.raises(ValueError, match="longer than"):  # an own template goes through the same prompt checks
        learn_token(model, images, InversionSettings(**short, templates=("word " * 80 + "{}",)))


def test_training_moves_only_the_token_lowers_the_loss_and_is_seeded(world, images):  # noqa: F811
    """20 updates of batch 4 on the toy model (lr 5e-3 unscaled: the recipe's 0.08 takes steps larger than the toy
    embeddings themselves, so its loss only falls over hundreds of updates): the model is untouched (weights and
    gradients), the denoising
    loss of the concept's images at fixed timesteps and noise falls (3% at seeds 0-2), the same seed gives the same
    token."""
    model = world[0]
    enc = model.cond_stage_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = InversionSettings(steps=20, batch_size=4, grad_accum=1, learning_rate=5e-3, scale_lr=False)
    vec, losses = learn_token(model, images, settings)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())  # no weight gradients computed or left behind
    assert len(losses) == 20 and vec.shape == (1, token_embedding_matrix(enc).shape[1])
    short = InversionSettings(steps=2, batch_size=2, grad_accum=2)
    one, two, other = (learn_token(model, images, short)[0], learn_token(model, images, short)[0],
                       learn_token(model, images, InversionSettings(steps=2, batch_size=2, grad_accum=2, seed=1))[0])
    assert torch.equal(one, two) and not torch.equal(one, other)

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    mean, std = posteriors(model, x)
    templates = [placeholder_template(enc, t.format(PH), PH) for t in STYLE_TEMPLATES]
    t = torch.linspace(50, 950, len(images)).long()

    def fixed_loss(v):  # the same latents, noise, timesteps and captions for both tokens
        with torch.no_grad():
            cond = encode_with_token(enc, [templates[i % len(templates)] for i in range(len(images))], v)
            return float(denoising_loss(model, cond, mean[0], std[0], torch.Generator().manual_seed(1), t=t))

    start = initial_vectors(enc, "art", 1)
    assert fixed_loss(vec) < 0.99 * fixed_loss(start)


def test_attack_end_to_end_on_the_toy_world(world, images):  # noqa: F811
    """prepare + attack with a real checker: one check after training, the learned embedding and the loss history
    recorded, the prompt holds the placeholder; the learned token changes the generation from the same noise."""
    model = world[0]
    attack = ConceptInversion(InversionSettings(steps=5, batch_size=4, grad_accum=1))
    with pytest.raises(ValueError, match="targets is empty"):
        attack.prepare(model, Concept("stripes"))
    concept = Concept("stripes", (), images)
    with pytest.raises(ValueError, match="single token"):
        ConceptInversion(InversionSettings(initializer="van gogh")).prepare(model, concept)
    t0 = time.perf_counter()
    attack.prepare(model, concept)
    check = ToyChecker(world)
    result = attack.attack(model, "a painting of a red star in the style of stripes", concept=concept, check=check,
                           index=0, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - t0
    assert result.prompt == f"a painting of a red star in the style of {PH}"
    assert result.extra["prompt_from"] == "replaced"
    assert check.calls == [(4, result.success)] and len(result.losses) == 5
    assert result.first_success == (4 if result.success else None)
    assert torch.equal(result.embedding, attack.vectors) and len(result.images) == 1

    untrained = ConceptInversion(attack.settings)
    untrained.vectors, untrained.losses = initial_vectors(model.cond_stage_model, "art", 1), [0.0]
    plain = untrained.attack(model, "a painting of a red star in the style of stripes", concept=concept,
                             check=ToyChecker(world), index=0)
    assert np.abs(plain.images[0].astype(int) - result.images[0].astype(int)).mean() > 1.0
    print(f"inversion toy: {seconds:.2f} s for 5 updates of 4 images + one check")
    assert seconds < 60


def test_captions_from_prompts_caption_each_image_by_its_own_prompt(world, images, monkeypatch):  # noqa: F811
    """captions="prompts": image i is trained with its own prompt, the concept's name replaced by the token (a
    template where the prompt does not name it); without the prompts it is refused."""
    import attacks.inversion as inv

    model = world[0]
    enc = model.cond_stage_model
    prompts = ["a painting of a red circle in the style of stripes", "a blue star", "stripes on a green heart"]
    seen = []
    real = inv.encode_with_token

    def spy(encoder, templates, vectors, fixed=None):
        seen.extend(tuple(t.ids.tolist()) for t in templates)
        return real(encoder, templates, vectors, fixed)

    monkeypatch.setattr(inv, "encode_with_token", spy)
    settings = InversionSettings(steps=2, batch_size=3, grad_accum=1, captions="prompts", templates=("{} style",))
    learn_token(model, images[:3], settings, prompts=prompts, concept="stripes")
    want = {tuple(placeholder_template(enc, t, PH).ids.tolist())
            for t in (f"a painting of a red circle in the style of {PH}", f"{PH} style", f"{PH} on a green heart")}
    assert set(seen) == want and len(seen) == 6  # each image once per update, by its own caption
    with pytest.raises(ValueError, match="captions=prompts needs the prompt of every training image"):
        learn_token(model, images[:3], settings, prompts=prompts[:2], concept="stripes")
    with pytest.raises(ValueError, match="captions"):
        InversionSettings(captions="words")
