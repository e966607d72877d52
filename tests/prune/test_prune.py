"""ConceptPrune (prune/, prune.jobs behind conceptprune.py) on the tiny SD-v1-structured model."""

import pytest
import torch
from conftest import ROOT, TINY_CONFIG, tiny_model

from ldm.checkpoint import load_state_dict
from prune.hooks import ActivationRecorder, MaskApplier, ff2_layers
from prune.prompts import DEFAULTS, build_pairs
from prune.wanda import (
    MaskError,
    compute_masks,
    load_masks,
    save_masks,
    skilled_mask,
    to_dense,
    to_indices,
    union_of,
    union_over_calls,
    wanda_scores,
)


def _cli():
    from prune import jobs

    return jobs


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def _unet_call(model, batch=2, side=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, side, side, generator=g)
    c = torch.randn(batch, 3, 32, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    with torch.no_grad():
        return model.apply_model(x, t, c)


# ------------------------------------------------------------------ hooks
def test_hook_order_is_execution_order_not_name_order(model):
    layers = ff2_layers(model)
    seen = []
    hs = [x.module.register_forward_pre_hook(lambda m, a, n=x.name: seen.append(n)) for x in layers]
    try:
        _unet_call(model)
    finally:
        for h in hs:
            h.remove()
    assert seen == [x.name for x in layers]
    assert len(layers) == 7 and all(x.name.endswith("ff.net.2") and x.name.startswith("model.diffusion_model.")
                                    for x in layers)
    assert [x.name.split(".")[2] for x in layers] == ["input_blocks"] * 2 + ["middle_block"] + ["output_blocks"] * 4


def test_hook_order_sd_v1_sixteen_blocks():
    """The full SD-v1 UNet (meta device, no weights): 16 blocks, input 1,2,4,5,7,8 / middle / output 3..11."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    config = OmegaConf.load(ROOT / "configs/stable-diffusion/v1-inference.yaml")
    cfg = OmegaConf.to_container(config.model.params.unet_config, resolve=True)
    with torch.device("meta"):
        unet = instantiate_from_config(cfg)
    names = [x.name for x in ff2_layers(unet)]
    blocks = [".".join(n.split(".")[:2]) if not n.startswith("middle") else "middle_block" for n in names]
    assert blocks == [f"input_blocks.{i}" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block"] + \
        [f"output_blocks.{i}" for i in range(3, 12)]
    assert blocks != sorted(blocks)


def test_recorder_accumulates_row_normalised_sum_of_squares_fp32():
    lin = torch.nn.Linear(4, 2)
    from prune.hooks import FF2Layer

    rec = ActivationRecorder([FF2Layer("l", lin)])
    x1 = torch.tensor([[[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]], dtype=torch.float16)
    x2 = torch.tensor([[[1.0, 1.0, 1.0, 1.0]]], dtype=torch.bfloat16)
    with rec:
        lin.half()(x1)            # generation 1, call 0
        lin.bfloat16()(x2)        # generation 1, call 1
        rec.start_generation()
        lin.float()(x1.float())   # generation 2, call 0
        lin(x2.float())           # generation 2, call 1
    n = rec.norms()[0]
    assert n.dtype == torch.float32 and n.shape == (2, 4)
    expect0 = torch.tensor([2 * 0.36, 2 * 0.64, 0.0, 2 * 1.0]).sqrt()
    expect1 = torch.full((4,), (2 * 0.25) ** 0.5)
    torch.testing.assert_close(n[0], expect0)
    torch.testing.assert_close(n[1], expect1)
    assert rec.n_calls == 2 and rec.generations == 2


def test_masked_hook_forward_equals_zeroed_weights(model):
    layers = ff2_layers(model)
    g = torch.Generator().manual_seed(3)
    dense = [torch.rand(x.shape, generator=g) < 0.3 for x in layers]
    with MaskApplier(layers, lambda t, l: dense[l], n_calls=1):
        hooked = _unet_call(model)
    zeroed = tiny_model().eval()
    zl = ff2_layers(zeroed)
    with torch.no_grad():
        for x, m in zip(zl, dense):
            x.module.weight[m] = 0
    ref = _unet_call(zeroed)
    torch.testing.assert_close(hooked, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hooked, _unet_call(model))  # the mask did something
    with pytest.raises(RuntimeError, match="recorded for 1 calls"):
        with MaskApplier(layers, lambda t, l: dense[l], n_calls=1):
            _unet_call(model)
            _unet_call(model)


# ------------------------------------------------------------------ score / mask / union
def test_score_and_mask_rule_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5, -4.0],
                      [2.0, 1.0, -1.0, 3.0, 0.1]])
    a_tar = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.5])
    a_base = torch.tensor([0.5, 2.0, 0.5, 1.0, 1.0])
    torch.testing.assert_close(wanda_scores(w, a_tar), w.abs() * a_tar)
    # row 0 target scores: [1, 2, 3, 1, 2]  -> top-2 = cols 2 and (1 or 4: tie 2.0, lower index) 1
    # row 1 target scores: [2, 1, 1, 6, .05] -> top-2 = cols 3, 0
    # target > base: cols 0, 2, 3 (col 1: 1 < 2, col 4: 0.5 < 1)
    m = skilled_mask(w, a_tar, a_base, skill_ratio=0.4)  # k = int(0.4 * 5) = 2
    expect = torch.tensor([[False, False, True, False, False],
                           [True, False, False, True, False]])
    assert torch.equal(m, expect)
    # k = int(0.39 * 5) = 1: per row just the best, filtered
    assert torch.equal(skilled_mask(w, a_tar, a_base, 0.39),
                       torch.tensor([[False, False, True, False, False], [False, False, False, True, False]]))
    assert not skilled_mask(w, a_tar, a_base, 0.1).any()        # k = 0
    assert torch.equal(skilled_mask(w, a_tar, a_base, 1.0), (a_tar > a_base).expand(2, 5) & (w != 0))


def test_union_rule_and_sparse_roundtrip(tmp_path):
    shapes = [(2, 3), (1, 4)]
    dense = {(0, 0): [[1, 0, 0], [0, 0, 0]], (1, 0): [[0, 1, 0], [0, 0, 0]], (2, 0): [[0, 0, 1], [0, 0, 1]],
             (0, 1): [[0, 0, 0, 0]], (1, 1): [[1, 0, 0, 1]], (2, 1): [[0, 1, 0, 0]]}
    masks = {k: to_indices(torch.tensor(v, dtype=torch.bool)) for k, v in dense.items()}
    u = union_over_calls(masks, shapes, tau=2, n_calls=3)
    assert torch.equal(u[0], torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool))
    assert torch.equal(u[1], torch.tensor([[1, 0, 0, 1]], dtype=torch.bool))
    u1 = union_over_calls(masks, shapes, tau=1, n_calls=3)
    both = union_of([u1, union_over_calls({k: masks[k] for k in masks}, shapes, 3, 3)])
    assert torch.equal(both[0], torch.tensor([[1, 1, 1], [0, 0, 1]], dtype=torch.bool))
    with pytest.raises(ValueError, match="beyond the 3 recorded"):
        union_over_calls(masks, shapes, tau=4, n_calls=3)
    meta = {"n_calls": 3, "layers": [{"name": "a", "out_features": 2, "in_features": 3},
                                     {"name": "b", "out_features": 1, "in_features": 4}]}
    save_masks(tmp_path / "m.safetensors", masks, meta)
    back, bmeta = load_masks(tmp_path / "m.safetensors")
    assert bmeta["n_calls"] == 3 and set(back) == set(masks)
    for k, v in dense.items():
        assert torch.equal(to_dense(back[k], shapes[k[1]]), torch.tensor(v, dtype=torch.bool))


def test_compute_masks_shapes():
    w = [torch.randn(3, 8), torch.randn(2, 4)]
    nb = [torch.rand(2, 8), torch.rand(2, 4)]
    nt = [torch.rand(2, 8), torch.rand(2, 4)]
    masks = compute_masks(w, nb, nt, 0.25)
    assert set(masks) == {(t, l) for t in range(2) for l in range(2)}
    assert all(m.numel() <= w[l].shape[0] * int(0.25 * w[l].shape[1]) for (t, l), m in masks.items())


# ------------------------------------------------------------------ prompts
def test_prompt_pairs_and_errors(tmp_path):
    p = build_pairs("van gogh")
    assert p.family == "art" and p.defaults == DEFAULTS["art"] == (0.01, 10)
    assert p.base[0] == "a photo of a cat" and p.target[0] == "a cat in the style of Van Gogh"
    assert build_pairs("naked").defaults == (0.01, 9)
    obj = build_pairs("parachute")
    assert obj.defaults == (0.02, 10) and obj.target[0] == "a parachute in a road" and obj.base[0] == "a road"
    male = build_pairs("male")
    assert male.base[0] == "a headshot of a Man" and male.target[0] == "a headshot of a Woman"
    with pytest.raises(ValueError, match="unknown concept"):
        build_pairs("unicorn")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no non-empty lines"):
        build_pairs("memorize_0", target_file=empty)
    mem = tmp_path / "mem.txt"
    mem.write_text("a memorized caption\n")
    m = build_pairs("memorize_0", target_file=mem)
    assert m.base == [""] and m.target == ["a memorized caption"] and m.family == "memorize"
    with pytest.raises(ValueError, match="needs --target_file"):
        build_pairs("memorize_0")
    jl = tmp_path / "mem.jsonl"
    jl.write_text('{"caption": "Living room, no. 1", "index": 0}\n\n{"prompt": " second one "}\n')
    assert build_pairs("memorize_1", target_file=jl).target == ["Living room, no. 1", "second one"]
    jl.write_text('{"caption": "ok"}\n{"url": "x"}\n')
    with pytest.raises(ValueError, match=r"mem.jsonl:2: no caption"):
        build_pairs("memorize_1", target_file=jl)
    jl.write_text('{"caption": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"mem.jsonl:2: not JSON"):
        build_pairs("memorize_1", target_file=jl)


# the original's word lists and pair lists (ruchikachavhan/concept-prune, datasets/*.txt, utils/prompts.py)
THINGS = ["cat", "dog", "mouse", "bear", "car", "chair", "bag", "door", "rabbit", "ball", "bat", "horse", "bird",
          "flower", "bowl", "bottle", "wall", "building", "chicken", "duck"]
HUMANS = ["man", "woman", "girl", "boy", "child", "couple", "guy", "doctor", "nurse", "teacher", "lawyer", "mother",
          "father", "kid", "professor", "student", "group of friends", "celebrity"]
SCENES = ["road", "garden", "beach", "room", "park", "street", "shelter", "chair", "table", "bag", "tree", "forest"]
MALE = ["Man", "Boy", "person", "guy", "Father", "Son", "Brother", "Husband", "Uncle", "Nephew", "Grandfather", "King"]
FEMALE = ["Woman", "Girl", "female", "lady", "Mother", "Daughter", "Sister", "Wife", "Aunt", "Niece", "Grandmother",
          "Queen"]
CHURCH = [("road", "on a road"), ("park", "in the park"), ("beach", "near the beach"), ("street", "on the street"),
          ("house", "in front of a house"), ("statue", "in front of a statue"), ("tree", "near a tree"),
          ("forest", "in a forest")]
TRUCK = [("road", "on the road"), ("park", "in the park"), ("street", "on the street"),
         ("white car", "near a white car"), ("blue car", "near a blue car"), ("black car", "near a black car"),
         ("white automobile", "near a white automobile"), ("black automobile", "near a black automobile"),
         ("blue automobile", "near a blue automobile"), ("truck", "near a big truck"), ("tree", "near a tree"),
         ("forest", "in a forest"), ("house", "in front of a house")]


def test_prompt_pairs_are_the_originals():
    art = build_pairs("Van Gogh")
    assert art.base == [f"a photo of a {x}" for x in THINGS]
    assert art.target == [f"a {x} in the style of Van Gogh" for x in THINGS] and art.seeds is None
    nude = build_pairs("naked")
    assert nude.base == [f"a photo of a {x}" for x in HUMANS]
    assert nude.target == [f"a photo of a naked {x}" for x in HUMANS]
    tench = build_pairs("tench")
    assert tench.base == [f"a {x}" for x in SCENES] and tench.target == [f"a tench in a {x}" for x in SCENES]
    for name, pairs in (("church", CHURCH), ("garbage truck", TRUCK)):
        p = build_pairs(name)
        assert p.family == "object" and p.defaults == (0.02, 10)
        assert p.base == [f"a {b}" for b, _ in pairs] and p.target == [f"a {name} {t}" for _, t in pairs]
    male, female = build_pairs("male"), build_pairs("female")
    assert male.base == [f"a headshot of a {x}" for x in MALE]
    assert male.target == [f"a headshot of a {x}" for x in FEMALE]
    assert female.base == male.target and female.target == male.base


def test_gender_pairs_get_one_seed_each_in_0_249():
    p = build_pairs("male", seed=0)
    assert len(p.seeds) == len(p.base) == 12 and all(isinstance(s, int) and 0 <= s < 250 for s in p.seeds)
    assert len(set(p.seeds)) > 6  # drawn per pair, not one for all
    assert build_pairs("male", seed=0).seeds == p.seeds and build_pairs("male", seed=1).seeds != p.seeds
    assert build_pairs("female", seed=0).seeds == p.seeds


def test_sample_prompts_per_prompt_seeds(model):
    # prompt i starts from the seed-seeds[i] noise, whatever its batch: equal to sampling it alone with that seed
    import dataclasses

    cli = _cli()
    args = cli.SamplingSettings(H=16, W=16, steps=2, scale=7.5, seed=0, batch_size=3, precision="full", device="cpu")
    prompts = ["a headshot of a Man", "a headshot of a Boy", "a headshot of a person"]
    together = cli.sample_prompts(model, prompts, args, decode=3, seeds=[5, 7, 5])
    for prompt, seed, image in zip(prompts, [5, 7, 5], together):
        alone = cli.sample_prompts(model, [prompt], dataclasses.replace(args, seed=seed), decode=1)
        assert abs(alone[0].astype(int) - image.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        cli.sample_prompts(model, prompts, args, seeds=[1, 2])


# ------------------------------------------------------------------ command line
TINY = ["--config", str(TINY_CONFIG), "--H", "16", "--W", "16", "--steps", "2", "--precision", "full",
        "--device", "cpu"]
TINY_SETTINGS = dict(config=str(TINY_CONFIG), H=16, W=16, steps=2, precision="full", device="cpu")


def _prompt_files(tmp_path, n=3, word="cat"):
    base, target = tmp_path / "base.txt", tmp_path / "target.txt"
    base.write_text("".join(f"a photo of a {x}\n" for x in ["dog", "car", "tree"][:n]))
    target.write_text("".join(f"a {x} in the style of {word}\n" for x in ["dog", "car", "tree"][:n]))
    return base, target


NORM_RTOL = 1e-4  # other batch sizes move the norms by ~1e-5 relative on CPU


def _assert_masks_equal_but_near_ties(masks_a, masks_b, norms, weights, meta, skill_ratio):
    """Masks of two recordings agree except entries whose target score lies within the norm tolerance of
    the row's top-k boundary, or whose target norm lies within it of the base norm (``norms``: run a's)."""
    band = 2 * NORM_RTOL  # both runs' values may move
    flipped = total = 0
    for (t, l), idx in masks_a.items():
        layer = meta["layers"][l]
        shape = (layer["out_features"], layer["in_features"])
        a, b = to_dense(idx, shape), to_dense(masks_b[(t, l)], shape)
        total += int(a.sum())
        diff = (a ^ b).nonzero().tolist()
        if not diff:
            continue
        tar, bas = norms[f"target.{l}"][t].double(), norms[f"base.{l}"][t].double()
        score = weights[layer["name"]].double().abs() * tar[None, :]
        k = int(skill_ratio * shape[1])
        top = score.sort(dim=1, descending=True).values
        for i, j in diff:
            v_k, v_next = top[i, k - 1], top[i, k] if k < shape[1] else top[i, k - 1]
            at_boundary = v_next - band * v_k <= score[i, j] <= v_k + band * v_k
            at_tie = abs(tar[j] - bas[j]) <= band * max(tar[j], bas[j])
            assert at_boundary or at_tie, (t, l, i, j, float(score[i, j]), float(v_k), float(tar[j]), float(bas[j]))
        flipped += len(diff)
    assert total > 0 and flipped <= max(4, 0.01 * total), (flipped, total)  # a near-tie is rare


def test_cli_discover_prune_check_sample(tmp_path, tiny_ckpt):
    cli = _cli()
    base, target = _prompt_files(tmp_path)
    out = tmp_path / "run"
    common = dict(ckpt=str(tiny_ckpt), outdir=str(out), **TINY_SETTINGS)
    s1 = cli.run_discover(cli.DiscoverSettings(concept="mystyle", base_file=str(base), target_file=str(target),
                                               skill_ratio=0.25, batch_size=2, save_images=2, **common))
    assert not s1["norms_reused"] and s1["n_calls"] == 3
    assert (out / "images" / "target_1.png").is_file()
    masks, meta = load_masks(s1["masks"])
    assert meta["n_calls"] == 3 and len(meta["layers"]) == 7 and meta["skill_ratio"] == 0.25
    assert sum(s1["masked_per_call"]) > 0

    # determinism: a fresh recording with the same settings (other outdir) is bit-identical
    rerun = dict(concept="mystyle", base_file=str(base), target_file=str(target), skill_ratio=0.25, save_images=0,
                 ckpt=str(tiny_ckpt), **TINY_SETTINGS)
    s2 = cli.run_discover(cli.DiscoverSettings(**rerun, batch_size=2, outdir=str(tmp_path / "run2")))
    masks2, _ = load_masks(s2["masks"])
    assert all(torch.equal(masks[k], masks2[k]) for k in masks)
    norms, norms2 = load_state_dict(s1["norms"]), load_state_dict(s2["norms"])
    assert sorted(norms) == sorted(norms2) and all(torch.equal(norms[k], norms2[k]) for k in norms)
    # another batch size runs other CPU kernels: the norms agree to float tolerance, the masks except near-ties
    s3 = cli.run_discover(cli.DiscoverSettings(**rerun, batch_size=3, outdir=str(tmp_path / "run3")))
    masks3, _ = load_masks(s3["masks"])
    norms3 = load_state_dict(s3["norms"])
    assert all(torch.allclose(norms[k], norms3[k], rtol=NORM_RTOL, atol=1e-7) for k in norms)
    base_sd = load_state_dict(tiny_ckpt)
    weights = {x["name"]: base_sd[x["name"] + ".weight"] for x in meta["layers"]}
    _assert_masks_equal_but_near_ties(masks, masks3, norms, weights, meta, 0.25)

    # a new skill_ratio reuses the norms; changed prompts do not
    s3 = cli.run_discover(cli.DiscoverSettings(concept="mystyle", base_file=str(base), target_file=str(target),
                                               skill_ratio=0.5, **common))
    assert s3["norms_reused"] and s3["norms"] == s1["norms"] and s3["masks"] != s1["masks"]
    (tmp_path / "other").mkdir()
    b2, t2 = _prompt_files(tmp_path / "other", n=2)
    s4 = cli.run_discover(cli.DiscoverSettings(concept="mystyle", base_file=str(b2), target_file=str(t2),
                                               skill_ratio=0.3, save_images=0, **common))
    assert not s4["norms_reused"] and s4["norms"] != s1["norms"]

    # prune: union over the first 2 calls, two "concepts" in one union
    delta = tmp_path / "pruned.ckpt"
    cli.run_prune(cli.PruneSettings(masks=(s1["masks"], s4["masks"]), tau=2, out=str(delta), ckpt=str(tiny_ckpt),
                                    config=str(TINY_CONFIG)))
    shapes = [(x["out_features"], x["in_features"]) for x in meta["layers"]]
    m4, _ = load_masks(s4["masks"])
    unions = union_of([union_over_calls(masks, shapes, 2, 3), union_over_calls(m4, shapes, 2, 3)])
    from runtime.delta import apply_delta
    sd = load_state_dict(delta)
    assert sorted(sd) == sorted(x["name"] + ".weight" for x in meta["layers"])
    pruned = tiny_model()
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    written = apply_delta(pruned, delta)
    after = pruned.state_dict()
    assert len(written) == 7
    for x, u in zip(meta["layers"], unions):
        k = x["name"] + ".weight"
        assert u.any()
        assert torch.equal(after[k][u], torch.zeros(int(u.sum())))
        assert torch.equal(after[k][~u], before[k][~u])
        assert (before[k][u] != 0).all()
    assert all(torch.equal(after[k], before[k]) for k in before if k not in sd)

    # sample.py consumes it like an ablation delta
    from runtime.sample import SampleSettings, run
    imgs = run(SampleSettings(ckpt=str(tiny_ckpt), delta_ckpt=str(delta), config=str(TINY_CONFIG), prompt="a dog",
                              n_samples=1, H=16, W=16, ddim_steps=2, plms=True, scale=7.5,
                              outdir=str(tmp_path / "samples"), precision="full"))
    assert len(imgs) == 1 and imgs[0].is_file()

    # check: side-by-side original | pruned
    written = cli.run_check(cli.CheckSettings(masks=s1["masks"], n_prompts=2, **common))
    from PIL import Image
    assert len(written) == 2 and Image.open(written[0]).size == (36, 16)
    assert (out / "check" / "prompts.txt").read_text().splitlines() == target.read_text().splitlines()[:2]

    # errors before any model work
    with pytest.raises(ValueError, match="beyond the 3"):
        cli.settings_from_argv(["prune", "--masks", s1["masks"], "--tau", "4", "--ckpt", str(tiny_ckpt),
                                "--config", str(TINY_CONFIG)])
    with pytest.raises(ValueError, match="beyond the 3"):  # the same check for settings made in Python
        cli.run_prune(cli.PruneSettings(masks=(s1["masks"],), tau=4, ckpt=tiny_ckpt, config=TINY_CONFIG))
    with pytest.raises(ValueError, match="--steps 2"):
        cli.settings_from_argv(["check", "--masks", s1["masks"], "--ckpt", str(tiny_ckpt), "--outdir", str(out),
                                *TINY[:6], "--steps", "4"])
    bad_meta = dict(meta, layers=[dict(x, in_features=x["in_features"] + 1) for x in meta["layers"]])
    save_masks(tmp_path / "bad.safetensors", {k: v[:0] for k, v in masks.items()}, bad_meta)
    with pytest.raises(MaskError, match="do not fit"):
        cli.settings_from_argv(["prune", "--masks", str(tmp_path / "bad.safetensors"), "--ckpt", str(tiny_ckpt),
                                "--config", str(TINY_CONFIG)])


def test_cli_input_errors(tmp_path, tiny_ckpt):
    cli = _cli()
    common = ["--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path), *TINY]
    with pytest.raises(ValueError, match="unknown concept"):
        cli.settings_from_argv(["discover", "--concept", "unicorn", *common])
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="no non-empty lines"):
        cli.settings_from_argv(["discover", "--concept", "x", "--base_file", str(empty), "--target_file", str(empty),
                                *common])
    with pytest.raises(FileNotFoundError):
        cli.settings_from_argv(["discover", "--concept", "Monet", "--ckpt", str(tmp_path / "nope.ckpt"), "--config",
                                str(TINY_CONFIG)])
    with pytest.raises(FileNotFoundError):
        cli.settings_from_argv(["prune", "--masks", str(tmp_path / "none.safetensors"), "--ckpt", str(tiny_ckpt),
                                "--config", str(TINY_CONFIG)])
    with pytest.raises(ValueError, match="steps=3"):
        cli.settings_from_argv(["discover", "--concept", "Monet", "--ckpt", str(tiny_ckpt), "--config",
                                str(TINY_CONFIG), "--steps", "3"])


def test_main_exit_2_and_one_line(tmp_path, tiny_ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        _cli().main(["discover", "--concept", "unicorn", "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path), *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown concept" in err and err.count("\n") == 1


def test_command_line_defaults_are_the_settings_defaults():
    cli = _cli()
    assert cli.parse_argv(["discover", "--concept", "x"]) == cli.DiscoverSettings(concept="x")
    assert cli.parse_argv(["check", "--masks", "m"]) == cli.CheckSettings(masks="m")
    assert cli.parse_argv(["prune", "--masks", "a", "b"]) == cli.PruneSettings(masks=("a", "b"))
