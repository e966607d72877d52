"""The attack job end to end on the toy world: records, the ASR table, resume, sharding, early errors.

Besides ``none``, the runs use :class:`AppendStyle`, a real (if naive) attack written here: it appends the concept's
words to the prompt, one more word per step, and checks each step. On painting prompts without the texture the
judge sees no stripes before the attack and stripes after it, so pre- and post-attack ASR differ for real.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from attacks import job, registry
from attacks.base import AttackResult
from attacks.job import AttackSettings
from toyworld.mission import ASSETS, asset_paths

TOY = asset_paths(ASSETS)
FFN_DELTA = ASSETS / "ffn" / "ffn_delta.safetensors"  # a delta of UNet FFN weights only (experiments.ffn's waves)
PAINTINGS = ["a painting of a red circle", "a painting of a blue square", "a drawing of a green star",
             "a painting of a yellow heart", "a picture of a purple triangle"]


@dataclass(frozen=True)
class AppendSettings:
    suffix: str = ", in the style of stripes"
    steps: int = 2
    added_tokens: int = 6

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


class AppendStyle:
    """Step k checks ``prompt + suffix`` with the suffix's first k + 1 words; stops at the first success."""

    name: ClassVar[str] = "append"
    needs_base: ClassVar[bool] = False
    needs_targets: ClassVar[bool] = False
    calls: ClassVar[list] = []  # (prompt) of every attack() call, across instances

    def __init__(self, settings: AppendSettings):
        self.settings = settings

    def prepare(self, model, concept) -> None:
        self.concept = concept

    @torch.no_grad()
    def attack(self, model, prompt, *, concept, check, index, base=None, generator=None, progress=None):
        assert not any(p.requires_grad for p in model.parameters())  # the job hands over a frozen model
        AppendStyle.calls.append(prompt)
        words = self.settings.suffix.split()
        losses, images, first, adv = [], [], None, prompt
        for step in range(self.settings.steps):
            adv = prompt + " " + " ".join(words[: len(words) - self.settings.steps + step + 1])
            result = check(model.get_learned_conditioning([adv]), step)
            losses.append(float(self.settings.steps - step))
            images.append(result.image)
            if progress:
                progress(step, min(losses))
            if result.success:
                first = step
                break
        return AttackResult(prompt=adv, success=first is not None, first_success=first, losses=losses,
                            images=images, embedding=torch.zeros(1, 4), extra={"words": len(adv.split())})


@pytest.fixture(autouse=True)
def append_registered(monkeypatch):
    monkeypatch.setitem(registry.ATTACKS, AppendStyle.name, (AppendStyle, AppendSettings))
    AppendStyle.calls.clear()


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "paintings.txt"
    p.write_text("\n".join(PAINTINGS) + "\n")
    return p


def settings(tmp_path, prompt_file, **kw) -> AttackSettings:
    base = dict(attacks=("append",), concept="toy:stripes", base=str(TOY["weights"]), config=str(TOY["config"]),
                prompts=str(prompt_file), H=32, W=32, steps=10, precision="full", outdir=str(tmp_path / "out"))
    return AttackSettings(**{**base, **kw})


def records(out, model="base", attack="append") -> dict:
    folder = out / "toy_stripes" / model / attack
    return {json.loads(f.read_text())["id"]: f for f in sorted(folder.glob("*.json"))}


def test_end_to_end_records_and_table(tmp_path, prompts):
    summaries = job.run(settings(tmp_path, prompts))
    out = tmp_path / "out"
    for attack in ("none", "append"):
        recs = {k: json.loads(f.read_text()) for k, f in records(out, attack=attack).items()}
        assert sorted(recs) == [f"prompt-{i:05d}" for i in range(len(PAINTINGS))]
        for i, r in enumerate(recs.values()):
            assert r["prompt"] == PAINTINGS[i] and r["seed"] == i and r["attack"] == attack
            assert r["success"] == any(c["success"] for c in r["checks"])  # the judge's verdicts, as recorded
            for rel in r["images"]:
                assert (out / "toy_stripes" / "base" / attack / rel).is_file()
        wins = sum(r["success"] for r in recs.values())
        sm = summaries["base"]["attacks"][attack]
        assert sm["successes"] == wins and sm["n"] == len(PAINTINGS)
        assert sm["asr"] == pytest.approx(wins / len(PAINTINGS))
        assert sm["se"] == pytest.approx((sm["asr"] * (1 - sm["asr"]) / len(PAINTINGS)) ** 0.5)
        drawn = sorted((r["prompt"], r["seed"], r["success"]) for r in recs.values())
        assert sorted(map(tuple, sm["outcomes"])) == drawn
    none = {k: json.loads(f.read_text()) for k, f in records(out, attack="none").items()}
    assert all(r["first_success"] in (-1, None) and len(r["checks"]) == 1 for r in none.values())
    app = {k: json.loads(f.read_text()) for k, f in records(out).items()}
    for r in app.values():  # the attack stops at its first success, which its record names
        assert r["first_success"] == (len(r["checks"]) - 1 if r["success"] else None)
        assert r["embedding"] and (out / "toy_stripes" / "base" / "append" / r["embedding"]).is_file()
    # painting prompts: the judge sees no stripes before the attack, and stripes once they are asked for
    assert summaries["base"]["attacks"]["none"]["asr"] < summaries["base"]["attacks"]["append"]["asr"]
    md = (out / "results.md").read_text()
    assert md.splitlines()[0] == ("| model | toy:stripes: pre-attack ASR (none) ↓ | toy:stripes: none ± SE | "
                                  "toy:stripes: append ASR ↓ | toy:stripes: append ± SE |")
    table = json.loads((out / "results.json").read_text())
    assert table["base"]["toy:stripes: append ASR"] == pytest.approx(summaries["base"]["attacks"]["append"]["asr"])


def test_resume_redoes_exactly_the_missing_prompt(tmp_path, prompts):
    s = settings(tmp_path, prompts, limit=3)
    job.run(s)
    assert AppendStyle.calls == PAINTINGS[:3]  # one call per prompt
    out = tmp_path / "out"
    recs = records(out)
    mtimes = {k: f.stat().st_mtime_ns for k, f in recs.items()}
    recs["prompt-00001"].unlink()
    AppendStyle.calls.clear()
    job.run(s)
    assert AppendStyle.calls == [PAINTINGS[1]]  # only the missing prompt, and none's records stay as they are
    after = {k: f.stat().st_mtime_ns for k, f in records(out).items()}
    assert after["prompt-00000"] == mtimes["prompt-00000"] and after["prompt-00002"] == mtimes["prompt-00002"]
    assert set(after) == set(mtimes)
    AppendStyle.calls.clear()
    job.run(dataclasses.replace(s, overrides=("append.steps=3",)))  # other settings: another cache key
    assert AppendStyle.calls == PAINTINGS[:3]
    assert len(list((out / "toy_stripes" / "base" / "append").glob("*.json"))) == 6


def test_sharding_by_rank_gives_disjoint_prompts(tmp_path, prompts, monkeypatch):
    from runtime.dist import external_shard

    s = settings(tmp_path, prompts, attacks=("none",))
    done = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        plan = job.check(s)
        before = set(records(tmp_path / "out", attack="none"))
        job.work(plan, external_shard(), "cpu")
        done.append(set(records(tmp_path / "out", attack="none")) - before)
    assert done[0] == {f"prompt-{i:05d}" for i in (0, 2, 4)} and done[1] == {f"prompt-{i:05d}" for i in (1, 3)}


def test_checker_makes_generate_images_image(tmp_path, prompts):
    """A check of the prompt's own conditioning is the image generate_images makes for that prompt and seed."""
    from PIL import Image

    from evaluation.models import load_model, parse_models
    from ldm.util import load_model_config
    from runtime.generate import generate_images

    s = settings(tmp_path, prompts, attacks=("none",), limit=2)
    job.run(s)
    cfg = load_model_config(TOY["config"])
    model = load_model(parse_models(s.base)[0], cfg, s.base)
    generate_images(lambda d: model, PAINTINGS[:2], tmp_path / "gen", s.sampling(), seeds=[0, 1], devices=("cpu",))
    for i, f in enumerate(records(tmp_path / "out", attack="none").values()):
        rec = json.loads(f.read_text())
        ours = np.asarray(Image.open(f.parent / rec["images"][0]))
        theirs = np.asarray(Image.open(tmp_path / "gen" / "samples" / f"{i:05d}.png"))
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("change, message", [
    ({"attacks": ("unlearn",)}, "--attack unlearn: unknown attack"),
    ({"overrides": ("append.stepz=3",)}, "append has no setting 'stepz'"),
    ({"overrides": ("append.steps=x",)}, "expected int"),
    ({"overrides": ("append.steps=0",)}, "steps must be >= 1"),
    ({"overrides": ("none.x=1",)}, "none has no setting 'x'"),
    ({"concept": "toy:zigzag"}, "unknown toy concept"),
    ({"concept": "shapes:circle"}, "unknown preset kind 'shapes'"),
    ({"prompts": "missing.txt"}, "prompt file not found"),
    ({"delta": ("ca=missing.safetensors",)}, "--delta ca=missing.safetensors: file not found"),
    ({"overrides": ("append.added_tokens=70",)}, "tokens; with the attacks' added tokens at most 5 fit"),
    ({"base": "missing.ckpt"}, "base checkpoint not found"),
    ({"steps": 3000}, "steps=3000: lms steps on fractional timesteps in [0, 999], at most 1000"),
    ({"max_prompt_tokens": 1}, "no prompt is that short"),
    ({"delta": (f"targets={FFN_DELTA}",)}, "model name 'targets': the job keeps its targets folder"),
])
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, prompts, capsys, change, message):
    s = settings(tmp_path, prompts, **change)
    argv = ["--attack", *s.attacks, "--concept", s.concept, "--base", s.base, "--config", s.config, "--prompts",
            s.prompts, "--H", "32", "--W", "32", "--steps", str(s.steps), "--precision", "full", "--outdir", s.outdir]
    for flag, values in (("--delta", s.delta), ("--set", s.overrides)):
        for v in values:
            argv += [flag, v]
    if s.max_prompt_tokens:
        argv += ["--max_prompt_tokens", str(s.max_prompt_tokens)]
    with pytest.raises(SystemExit) as e:
        job.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_base_required_by_a_teacher_attack(tmp_path, prompts, monkeypatch):
    class Teacher(AppendStyle):
        name: ClassVar[str] = "teacher"
        needs_base: ClassVar[bool] = True

    monkeypatch.setitem(registry.ATTACKS, "teacher", (Teacher, AppendSettings))
    with pytest.raises(ValueError, match="--attack teacher needs the un-erased base model"):
        job.check(settings(tmp_path, prompts, attacks=("teacher",), base=str(tmp_path / "nope.ckpt")))
    assert not (tmp_path / "out").exists()


def test_an_attack_that_needs_pairs_needs_a_concept_with_pairs(tmp_path, prompts, monkeypatch):
    class Paired(AppendStyle):
        name: ClassVar[str] = "paired"
        needs_pairs: ClassVar[bool] = True

    monkeypatch.setitem(registry.ATTACKS, "paired", (Paired, AppendSettings))
    assert job.check(settings(tmp_path, prompts, attacks=("paired",))).preset.concept.pairs  # the toy world's
    artist = settings(tmp_path, prompts, attacks=("paired",), concept="artist:van gogh", prompts=None,
                      clip_model=str(TOY["clip"]), score_device="cpu")  # the artist preset has no pairs
    with pytest.raises(ValueError, match="--attack paired needs prompt pairs .* give --pairs FILE"):
        job.check(artist)
    assert not (tmp_path / "out").exists()
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("prompt,prompt1\na painting by Vincent van Gogh,a painting\n")
    assert job.check(dataclasses.replace(artist, pairs=str(pairs))).preset.concept.pairs == (
        ("a painting by Vincent van Gogh", "a painting"),)


def test_targets_folder_is_checked(tmp_path, prompts, monkeypatch):
    class Targeted(AppendStyle):
        name: ClassVar[str] = "targeted"
        needs_targets: ClassVar[bool] = True

    monkeypatch.setitem(registry.ATTACKS, "targeted", (Targeted, AppendSettings))
    folder = tmp_path / "targets"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48)).save(folder / "a.png")
    with pytest.raises(ValueError, match="1 images for 5 prompts"):
        job.check(settings(tmp_path, prompts, attacks=("targeted",), targets=str(folder)))
    assert not (tmp_path / "out").exists()


def test_every_registered_attack_satisfies_the_protocol():
    import inspect

    assert registry.BASELINE in registry.ATTACKS
    for name, (cls, settings_cls) in registry.ATTACKS.items():
        assert cls.name == name
        assert isinstance(cls.needs_base, bool) and isinstance(cls.needs_targets, bool)
        assert dataclasses.is_dataclass(settings_cls) and settings_cls.__dataclass_params__.frozen
        obj = cls(settings_cls())
        params = inspect.signature(obj.attack).parameters
        assert {"concept", "check", "index", "base", "generator", "progress"} <= set(params), name
        assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in ("concept", "check", "index"))
        assert callable(obj.prepare)
        assert registry.added_tokens(settings_cls()) >= 0


def register_targeted(monkeypatch) -> dict:
    """Register attack "targeted" (AppendStyle that needs targets); returns the dict it fills with each prompt's
    target image by index."""
    seen = {}

    class Targeted(AppendStyle):
        name: ClassVar[str] = "targeted"
        needs_targets: ClassVar[bool] = True

        def attack(self, model, prompt, *, concept, check, index, **kw):
            seen[index] = concept.targets[index].copy()
            return super().attack(model, prompt, concept=concept, check=check, index=index, **kw)

    monkeypatch.setitem(registry.ATTACKS, "targeted", (Targeted, AppendSettings))
    return seen


def test_targets_default_to_the_base_models_images(tmp_path, prompts, monkeypatch):
    """Without --targets, target i is the base model's image of prompt i and its seed (cached): the very image of
    the base model's ``none`` check."""
    from PIL import Image

    seen = register_targeted(monkeypatch)
    job.run(settings(tmp_path, prompts, attacks=("targeted",), limit=2))
    assert sorted(seen) == [0, 1]
    out = tmp_path / "out"
    assert len(list((out / "toy_stripes" / "targets").glob("*/cfg7.5/samples/*.png"))) == 2
    for i, f in enumerate(records(out, attack="none").values()):
        rec = json.loads(f.read_text())
        assert np.array_equal(seen[i], np.asarray(Image.open(f.parent / rec["images"][0])))
    AppendStyle.calls.clear()
    job.run(settings(tmp_path, prompts, attacks=("targeted",), limit=3))  # more prompts: only the new one is attacked
    assert AppendStyle.calls == [PAINTINGS[2]] and sorted(seen) == [0, 1, 2]


def test_command_line_defaults_are_the_settings_defaults():
    assert job.parse_argv(["--attack", "none", "--concept", "toy:stripes"]) == \
        AttackSettings(attacks=("none",), concept="toy:stripes")


@pytest.mark.slow  # two spawned processes, each loading the toy model and the judge (~1 min on 2 shared cores)
def test_gpus_cpu_2_makes_the_single_process_records(tmp_path, prompts):
    one = settings(tmp_path, prompts, attacks=("none",), limit=3, outdir=str(tmp_path / "one"))
    two = dataclasses.replace(one, outdir=str(tmp_path / "two"), gpus="cpu:2")
    job.run(one)
    job.run(two)
    drop = ("seconds",)
    a = {k: {x: v for x, v in json.loads(f.read_text()).items() if x not in drop}
         for k, f in records(tmp_path / "one", attack="none").items()}
    b = {k: {x: v for x, v in json.loads(f.read_text()).items() if x not in drop}
         for k, f in records(tmp_path / "two", attack="none").items()}
    assert a == b and len(a) == 3
    assert (tmp_path / "two" / "results.md").read_text() == (tmp_path / "one" / "results.md").read_text()


def test_targets_folder_images_in_name_order(tmp_path, prompts, monkeypatch):
    """--targets: image i (name order) is prompt i's target, short side resized and centre-cropped to H x W."""
    from PIL import Image

    seen = register_targeted(monkeypatch)
    folder = tmp_path / "targets"
    folder.mkdir()
    colours = [(200, 10, 10), (10, 200, 10)]
    for name, c in zip(("b.png", "a.png"), colours):  # a.png is the first target
        im = Image.new("RGB", (64, 48), c)
        im.paste((0, 0, 255), (0, 0, 4, 48))  # a blue band the centre crop cuts away
        im.save(folder / name)
    job.run(settings(tmp_path, prompts, attacks=("targeted",), limit=2, targets=str(folder)))
    assert seen[0].shape == (32, 32, 3)
    # (the resize's kernel reaches 3 px into the crop from the band's edge)
    assert (seen[0][:, 3:] == colours[1]).all() and (seen[1][:, 3:] == colours[0]).all()
    assert (seen[0][:, 0, 2] < 255).all()  # the band itself is cropped away
    assert not (tmp_path / "out" / "toy_stripes" / "targets").exists()  # nothing generated


def test_an_outdir_in_use_is_refused(tmp_path, prompts, capsys):
    """benchmark.py's folder lock: while another process holds --outdir, a run is one line, exit 2, no records."""
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from runtime.files import lock_folder; "
                               f"lock_folder({str(out)!r}, 'holder'); print('held', flush=True); time.sleep(60)"],
                              cwd=str(job.Path(__file__).resolve().parents[2]), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        s = settings(tmp_path, prompts, attacks=("none",), limit=1)
        argv = ["--attack", "none", "--concept", s.concept, "--base", s.base, "--config", s.config, "--prompts",
                s.prompts, "--H", "32", "--W", "32", "--steps", "10", "--precision", "full", "--limit", "1",
                "--outdir", s.outdir]
        start = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            job.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "holder" in err, err
        assert not (out / "toy_stripes").exists() and time.perf_counter() - start < 30
    finally:
        holder.kill()
        holder.wait()


def test_a_check_that_samples_nan_stops(tmp_path):
    """A NaN sample would be a black image that no judge calls the concept (a false "erased"): the check stops."""
    from attacks.checker import GenerationChecker
    from evaluation.models import load_model, parse_models
    from ldm.util import load_model_config
    from runtime.generate import NonFiniteSampleError

    s = AttackSettings(attacks=("none",), concept="toy:stripes", H=32, W=32, steps=10, precision="full")
    model = load_model(parse_models(str(TOY["weights"]))[0], load_model_config(TOY["config"]), str(TOY["weights"]))
    with torch.no_grad():
        next(model.model.diffusion_model.out.parameters()).fill_(float("nan"))
        cond = model.get_learned_conditioning(["a painting of a red circle"])
    checker = GenerationChecker(model, s.sampling(), 0, lambda images: [{"success": False}] * len(images))
    with pytest.raises(NonFiniteSampleError, match="check of attack step 3 .* NaN or inf latents"):
        checker(cond, 3)
    assert checker.log == []


def test_prepared_state_is_kept_and_restored(tmp_path, prompts):
    """Concept inversion trains its token in prepare(): the job keeps it, and a rerun (or another rank) restores it
    instead of training again. Proof: a rerun leaves the kept file as it was, and a token planted in that file is
    the one the rerun's record carries."""
    from safetensors.torch import load_file, save_file

    s = settings(tmp_path, prompts, attacks=("inversion",), limit=2, steps=2,
                 overrides=("inversion.steps=2", "inversion.batch_size=1", "inversion.grad_accum=1"))
    job.run(s)
    folder = tmp_path / "out" / "toy_stripes" / "base" / "inversion"
    (kept,) = folder.glob("prepared-*.safetensors")
    state = load_file(str(kept))
    assert state["vectors"].shape[0] == 1 and state["losses"].numel() == 2
    recs = records(tmp_path / "out", attack="inversion")
    first = json.loads(recs["prompt-00001"].read_text())
    emb = load_file(str(folder / first["embedding"]))["embedding"]
    assert torch.equal(emb, state["vectors"].float())  # the record's token is the kept one
    planted = {"vectors": torch.full_like(state["vectors"], 0.25), "losses": state["losses"]}
    save_file(planted, str(kept))
    mtime = kept.stat().st_mtime_ns
    recs["prompt-00001"].unlink()
    job.run(s)
    assert kept.stat().st_mtime_ns == mtime  # restored, not trained and written again
    again = json.loads(records(tmp_path / "out", attack="inversion")["prompt-00001"].read_text())
    assert torch.equal(load_file(str(folder / again["embedding"]))["embedding"], planted["vectors"].float())


def test_a_longer_limit_redoes_the_records_of_a_prepared_token(tmp_path, prompts):
    """Concept inversion trains one token on all the targets: with a longer --limit (more target images) it trains
    another, and every prompt's record is made again with it, so a cell never mixes tokens. An attack without a
    prepared state keeps its records (test_targets_default_to_the_base_models_images)."""
    s = settings(tmp_path, prompts, attacks=("inversion",), limit=2, steps=2,
                 overrides=("inversion.steps=2", "inversion.batch_size=1", "inversion.grad_accum=1"))
    from safetensors.torch import load_file

    job.run(s)
    folder = tmp_path / "out" / "toy_stripes" / "base" / "inversion"
    first = {f.name for f in folder.glob("*.json")}
    (old,) = folder.glob("prepared-*.safetensors")
    job.run(dataclasses.replace(s, limit=3))
    (new,) = set(folder.glob("prepared-*.safetensors")) - {old}  # a second token, trained on three targets
    made = {f.name for f in folder.glob("*.json")} - first
    assert len(first) == 2 and len(made) == 3  # all three prompts again, none of the first records reused
    token = load_file(str(new))["vectors"].float()
    assert not torch.equal(token, load_file(str(old))["vectors"].float())
    for name in made:  # each new record carries the new token
        emb = load_file(str(folder / json.loads((folder / name).read_text())["embedding"]))["embedding"]
        assert torch.equal(emb, token)


def test_pairs_from_a_file_are_in_the_key(tmp_path, prompts, monkeypatch):
    """An attack that needs pairs: other --pairs, other records; the same pairs, the same records."""
    class Paired(AppendStyle):
        name: ClassVar[str] = "paired"
        needs_pairs: ClassVar[bool] = True

    monkeypatch.setitem(registry.ATTACKS, "paired", (Paired, AppendSettings))
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    one.write_text("prompt,prompt1\na painting in the style of stripes,a painting\n")
    two.write_text("prompt,prompt1\nstripes,a painting\n")
    s = settings(tmp_path, prompts, attacks=("paired",), limit=2, pairs=str(one))
    job.run(s)
    AppendStyle.calls.clear()
    job.run(s)
    assert AppendStyle.calls == []
    job.run(dataclasses.replace(s, pairs=str(two)))
    assert AppendStyle.calls == PAINTINGS[:2]


def test_inversion_captions_from_prompts_through_the_job(tmp_path, prompts):
    """The job hands each target's prompt to the attacks (Concept.target_prompts), so inversion's
    captions=prompts trains (it refuses without them) and its records are made."""
    s = settings(tmp_path, prompts, attacks=("inversion",), limit=2, steps=2,
                 overrides=("inversion.steps=2", "inversion.batch_size=1", "inversion.grad_accum=1",
                            "inversion.captions=prompts"))
    job.run(s)
    assert len(records(tmp_path / "out", attack="inversion")) == 2


def test_ring_a_bell_searches_are_shared_by_models_with_one_text_encoder(tmp_path, prompts):
    """The base and a UNet-only delta: each prompt is searched once (on the model attacked first), the other model
    reuses that search (the same adversarial prompt, its records say so) and is checked on itself."""
    s = settings(tmp_path, prompts, attacks=("ring_a_bell",), limit=2, delta=(f"waves={FFN_DELTA}",),
                 overrides=("ring_a_bell.population=8", "ring_a_bell.generations=3"))
    summaries = job.run(s)
    out = tmp_path / "out"
    base, waves = (records(out, model, "ring_a_bell") for model in ("base", "waves"))
    assert sorted(base) == sorted(waves) == ["prompt-00000", "prompt-00001"]
    for k in base:
        b, w = (json.loads(f.read_text()) for f in (base[k], waves[k]))
        assert (b["extra"]["search"], w["extra"]["search"]) == ("made", "shared")
        assert w["adversarial_prompt"] == b["adversarial_prompt"] and w["losses"] == b["losses"]
        assert w["extra"]["search_file"] == b["extra"]["search_file"] and len(w["checks"]) == 1
    assert len(list((out / "toy_stripes" / "searches" / "ring_a_bell").glob("*.json"))) == 2
    # seconds as spent, and as if the waves model had made its own searches (the base's search time added back)
    spent = {m: [json.loads(f.read_text()) for f in recs.values()] for m, recs in (("base", base), ("waves", waves))}
    cell = summaries["waves"]["attacks"]["ring_a_bell"]
    assert cell["seconds_per_prompt"] == pytest.approx(sum(r["seconds"] for r in spent["waves"]) / 2)
    assert cell["seconds_per_prompt_unshared"] == pytest.approx(
        sum(r["seconds"] + r["extra"]["search_seconds"] for r in spent["waves"]) / 2)
    assert summaries["base"]["attacks"]["ring_a_bell"]["seconds_per_prompt_unshared"] == pytest.approx(
        summaries["base"]["attacks"]["ring_a_bell"]["seconds_per_prompt"])
