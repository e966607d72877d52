"""ConceptPrune's original arithmetic (``arithmetic="original"`` of prune.wanda, ``--arithmetic original``).

The original's ``wanda/wanda.py`` scores ``|W| * norm`` with the fp16 weights of its fp16 pipeline and its fp16
norms, on the CPU, takes the per-row top-k with ``torch.sort(metric, dim=1, descending=True)`` (torch's default,
unstable) and keeps the entries where ``metric_target > metric_base`` (fp16). The tests re-create those steps
literally on fixed tensors and compare; the scores also against a float64 hand computation (one rounding of the
exact product), and a hand-made case shows the fp16 comparison dropping a weight that fp32 keeps.
"""
import pytest
import torch
from conftest import TINY_CONFIG
from omegaconf import OmegaConf

from ldm.checkpoint import load_state_dict
from prune.hooks import ff2_layers
from prune.jobs import DiscoverSettings, parse_argv, run_discover
from prune.wanda import compute_masks, load_masks, n_skilled, skilled_mask, to_indices, wanda_scores
from runtime.loading import load_model


def _original(weight, norm_target, norm_base, skill_ratio):
    """The original's steps, in its order and dtypes (wanda/wanda.py main, for one (t, l))."""
    abs_weights = weight.half().abs().cpu()
    metric_base = abs_weights * norm_base.half()
    metric_target = abs_weights * norm_target.half()
    binary_mask_target = torch.zeros_like(abs_weights)
    _, sorted_idx_target = torch.sort(metric_target, dim=1, descending=True)
    pruned = sorted_idx_target[:, :int(skill_ratio * metric_target.shape[1])]
    binary_mask_target.scatter_(1, pruned, 1)
    binary_mask = (metric_target > metric_base) * binary_mask_target
    return binary_mask.float() != 0


def _fixed(out=64, inn=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(out, inn, generator=g)
    a = 0.5 + 2 * torch.rand(inn, generator=g)
    # target and base norms 1% apart, as for the similar base/target prompts of a concept
    return (w, a * (1 + 0.01 * torch.randn(inn, generator=g)), a * (1 + 0.01 * torch.randn(inn, generator=g)))


def test_original_scores_are_one_fp16_rounding_of_the_exact_product():
    w, nt, _ = _fixed()
    got = wanda_scores(w, nt, "original")
    exact = w.half().double().abs() * nt.half().double()[None, :]  # exact: 11-bit times 11-bit significands
    assert got.dtype == torch.float16 and torch.equal(got, exact.half())
    assert wanda_scores(w, nt).dtype == torch.float32  # ours stays fp32
    with pytest.raises(ValueError, match="arithmetic must be one of"):
        wanda_scores(w, nt, "bf16")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("skill_ratio", [0.01, 0.05, 0.2])
def test_original_mask_equals_the_recreated_original(seed, skill_ratio):
    w, nt, nb = _fixed(seed=seed)
    got = skilled_mask(w, nt, nb, skill_ratio, "original")
    assert torch.equal(got, _original(w, nt, nb, skill_ratio))
    assert int(got.sum(dim=1).max()) <= n_skilled(skill_ratio, w.shape[1])


def test_fp16_comparison_drops_a_weight_that_fp32_keeps():
    # 1 + 2**-12 is 1 in fp16 (spacing 2**-10 there): the target's score equals the base's, so the original does
    # not prune the weight; in fp32 the target is larger and we do
    w = torch.ones(1, 4)
    nt = torch.tensor([1 + 2 ** -12, 0.1, 0.1, 0.1])
    nb = torch.tensor([1.0, 0.2, 0.2, 0.2])
    assert skilled_mask(w, nt, nb, 0.25).tolist() == [[True, False, False, False]]
    assert skilled_mask(w, nt, nb, 0.25, "original").tolist() == [[False, False, False, False]]


def test_ours_differs_from_the_original_on_fixed_tensors_and_mostly_by_dropping():
    # the measured example of docs/explanation/differences-from-original.md (here on a smaller tensor)
    w, nt, nb = _fixed(out=320, inn=1280)
    ours, orig = skilled_mask(w, nt, nb, 0.01), skilled_mask(w, nt, nb, 0.01, "original")
    assert int((ours ^ orig).sum()) > 0
    assert int(orig.sum()) < int(ours.sum())


def test_compute_masks_passes_the_arithmetic_on():
    w, nt, nb = _fixed()
    norms_t, norms_b = [torch.stack([nt, nt * 1.001])], [torch.stack([nb, nb])]
    masks = compute_masks([w], norms_b, norms_t, 0.05, "original")
    for t in range(2):
        assert torch.equal(masks[(t, 0)], to_indices(_original(w, norms_t[0][t], norms_b[0][t], 0.05)))


def test_discover_original_arithmetic_writes_its_own_masks(tmp_path, tiny_ckpt):
    base, target = tmp_path / "base.txt", tmp_path / "target.txt"
    base.write_text("a photo of a cat\na photo of a dog\n")
    target.write_text("a cat in mystyle\na dog in mystyle\n")
    common = dict(concept="mystyle", base_file=str(base), target_file=str(target), skill_ratio=0.25, save_images=0,
                  ckpt=str(tiny_ckpt), config=str(TINY_CONFIG), H=16, W=16, steps=2, precision="full",
                  device="cpu", batch_size=2, outdir=str(tmp_path / "run"))
    ours = run_discover(DiscoverSettings(**common))
    orig = run_discover(DiscoverSettings(**common, arithmetic="original"))
    assert orig["norms_reused"] and orig["norms"] == ours["norms"]  # the norms do not depend on the arithmetic
    assert orig["masks"].endswith("masks_sr0.25-original.safetensors")
    assert ours["masks"].endswith("masks_sr0.25.safetensors")
    assert orig["arithmetic"] == "original" and "arithmetic" not in ours
    masks, meta = load_masks(orig["masks"])
    assert meta["arithmetic"] == "original"
    norms = load_state_dict(orig["norms"])
    model = load_model(OmegaConf.load(TINY_CONFIG).model, str(tiny_ckpt), None, "cpu")
    weights = [x.module.weight.detach() for x in ff2_layers(model)]
    want = compute_masks(weights, [norms[f"base.{l}"] for l in range(len(weights))],
                         [norms[f"target.{l}"] for l in range(len(weights))], 0.25, "original")
    assert masks.keys() == want.keys() and all(torch.equal(masks[k], want[k]) for k in want)
    assert parse_argv(["discover", "--concept", "x", "--arithmetic", "original"]).arithmetic == "original"
