"""``python -m experiments.attack_study``: issue 31's proof on the toy world (plan, cache, one tiny run, the table)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from experiments import attack_study as study
from toyworld.mission import ASSETS, asset_paths


def _sets(settings) -> dict[str, dict[str, str]]:
    """``--set`` items as {attack: {field: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in settings.overrides:
        head, _, value = item.partition("=")
        attack, _, key = head.partition(".")
        out.setdefault(attack, {})[key] = value
    return out


def test_plan_models_attacks_concepts_and_settings(tmp_path):
    plans = study.plan(study.StudySettings(out=str(tmp_path), limit=7, sampler="dpmpp_2m", gpus="cpu:2"))
    assert [p.concept for p in plans] == ["stripes", "grumpy cat", "waves"]
    registered, _ = study.registered(study.ATTACKS)
    shipped = str(asset_paths(ASSETS)["weights"])
    for p in plans:
        s = p.settings
        assert s.concept == f"toy:{p.concept}" and s.attacks == tuple(registered) and s.attacks[0] == "none"
        assert (s.limit, s.sampler, s.steps, s.H, s.precision, s.gpus) == (7, "dpmpp_2m", 50, 32, "full", "cpu:2")
        assert s.outdir == str(tmp_path / "attacks") and s.delta == ()  # deltas are added once made
        assert [e.name for e in p.erasures] == ["ca", "ca-preserve", "cp"]
        assert [e.method for e in p.erasures] == ["ablation", "ablation", "conceptprune"]
        sets = _sets(s)
        for attack in registered:  # the study's budgets, never the attacks' defaults, for every attack run
            for key, value in study.BUDGETS.get(attack, {}).items():
                assert sets[attack][key] == str(value)
        assert set(sets) <= set(registered)  # nothing set for an attack that is not run
        if "inversion" in registered:
            kind = "object" if p.concept == "grumpy cat" else "style"
            assert sets["inversion"]["learnable_property"] == kind
    stripes, cat, waves = plans
    assert stripes.settings.base == cat.settings.base == shipped and not stripes.waves_base
    assert waves.waves_base and waves.settings.base == str(tmp_path / "erasures" / "base_waves.safetensors")
    # the erasures: the mission's recipes for stripes and the cat, experiments.ffn's for waves
    assert stripes.erasures[0].recipe["caption_target"] == "stripes" and stripes.erasures[0].recipe["regularization"]
    assert "preserve" in stripes.erasures[1].recipe and cat.erasures[1].recipe["caption_target"] == "cat+grumpy cat"
    assert cat.erasures[2].recipe["concept"] == "grumpy cat"
    ca, preserve, cp = waves.erasures
    assert ca.recipe["caption_target"] == "waves" and ca.recipe["regularization"]
    assert "regularization" not in preserve.recipe and preserve.recipe["overrides"] == study.PRESERVE_OVERRIDES
    assert cp.recipe == {"concept": "waves"}
    # the originals' budgets are the attacks' defaults (the study only lowers them by --set)
    from attacks.registry import make_settings

    for attack in registered:
        for key, value in study.ORIGINAL_BUDGETS.get(attack, {}).items():
            assert getattr(make_settings(attack), key) == value


def test_world_templates_are_the_worlds_phrases_for_each_kind():
    """``--inversion_templates world``: each style template is a phrase the world's captions use to name a style,
    each object template an object lead-in of theirs; set through ``--set`` for the concept's kind, and parsed
    back to the same tuple (no template holds the list's comma)."""
    from attacks.registry import make_settings
    from toyworld.captions import MEDIA, STYLE_PHRASES, STYLE_TEMPLATES, TEMPLATES

    style_text = list(STYLE_PHRASES) + list(STYLE_TEMPLATES)
    for t in study.WORLD_TEMPLATES["style"]:
        assert any(t.replace("{}", "{t}") in x for x in style_text), t
    leads = [x.replace("{medium}", m) for x in TEMPLATES for m in MEDIA]
    for t in study.WORLD_TEMPLATES["object"]:
        assert any(x.startswith(t.replace("a {}", "{obj}")) for x in leads), t
    for concept, kind in (("stripes", "style"), ("grumpy cat", "object"), ("waves", "style")):
        plan = study.plan(study.StudySettings(concepts=(concept,), inversion_templates="world"))[0]
        sets = _sets(plan.settings)["inversion"]
        assert make_settings("inversion", sets).templates == study.WORLD_TEMPLATES[kind]
    original = study.plan(study.StudySettings(concepts=("stripes",)))[0]
    assert "templates" not in _sets(original.settings).get("inversion", {})
    with pytest.raises(ValueError, match="--inversion_templates mine"):
        study.StudySettings(inversion_templates="mine")


def test_seed_offsets_plan_each_concept_again_and_pool_by_hand():
    """--seed 0 1000: one plan per concept and offset (the rows' seeds move by the offset), and the table pools
    the two runs cell by cell: successes and prompts summed, seconds weighted by prompts."""
    plans = study.plan(study.StudySettings(concepts=("stripes",), seeds=(0, 1000), limit=2))
    assert [(p.concept, p.settings.seed) for p in plans] == [("stripes", 0), ("stripes", 1000)]
    a = {"asr": 0.5, "se": 0.25, "successes": 2, "n": 4, "missing": 0, "pre_attack_successes": 1,
         "mean_first_success": 10.0, "seconds_per_prompt": 2.0}
    b = {"asr": 1.0, "se": 0.0, "successes": 2, "n": 2, "missing": 1, "pre_attack_successes": 2,
         "mean_first_success": 40.0, "seconds_per_prompt": 5.0}
    got = study.pool(a, b)
    assert (got["successes"], got["n"], got["missing"], got["pre_attack_successes"]) == (4, 6, 1, 3)
    assert got["asr"] == pytest.approx(4 / 6) and got["se"] == pytest.approx((4 / 6 * 2 / 6 / 6) ** 0.5)
    assert got["seconds_per_prompt"] == pytest.approx((4 * 2.0 + 2 * 5.0) / 6)
    assert study.cell(got).endswith("(6 of 7) · 3.0 s")  # b misses a prompt; no unshared seconds: as spent
    shared = study.pool({**a, "seconds_per_prompt_unshared": 12.0}, {**b, "seconds_per_prompt_unshared": 5.0})
    assert shared["seconds_per_prompt_unshared"] == pytest.approx((4 * 12.0 + 2 * 5.0) / 6)
    assert study.cell(shared).endswith("(6 of 7) · 9.7 s")  # the table shows what attacking the model alone costs
    assert got["mean_first_success"] == pytest.approx(25.0)  # both runs have 2 successes
    one = {"base": {"attacks": {"none": a}}}
    two = {"base": {"attacks": {"none": b, "inversion": b}}, "cp": {"attacks": {"none": b}}}
    pooled = study.pool_results(one, two)
    assert pooled["base"]["attacks"]["none"]["n"] == 6 and pooled["base"]["attacks"]["inversion"] is b
    assert pooled["cp"]["attacks"]["none"] is b and study.pool_results(None, two) is two
    with pytest.raises(ValueError, match="--seed 0 0"):
        study.StudySettings(seeds=(0, 0))


def test_pooled_draws_of_the_same_prompts_get_a_standard_error_clustered_by_prompt():
    """Three noise draws of two prompts, one always a success and one never: p = 1/2 over N = 6, and the prompt
    sums are +-1.5, so SE = sqrt(2 * 1.5^2) / 6 = 0.354, not sqrt(p (1 - p) / 6) = 0.204 as if six prompts. With one
    draw per prompt the clustered SE is the binomial one."""
    def run(outcomes):
        wins = sum(y for *_, y in outcomes)
        p = wins / len(outcomes)
        return {"asr": p, "se": (p * (1 - p) / len(outcomes)) ** 0.5, "successes": wins, "n": len(outcomes),
                "missing": 0, "pre_attack_successes": 0, "mean_first_success": None, "seconds_per_prompt": 1.0,
                "outcomes": outcomes}

    def draw(seed):
        return [["a", seed, True], ["b", seed + 1, False]]

    got = study.pool(study.pool(run(draw(0)), run(draw(1000))), run(draw(2000)))
    assert (got["n"], got["prompts"], got["asr"]) == (6, 2, 0.5)
    assert got["se"] == pytest.approx((2 * 1.5 ** 2) ** 0.5 / 6)
    assert study.cell(got) == "0.50 ± 0.35 (2×3) · 1.0 s" and study.cell(run(draw(0))) == "0.50 ± 0.35 (2) · 1.0 s"
    mixed = [["a", 0, True], ["b", 1, False], ["c", 2, True], ["d", 3, True]]
    assert study.clustered_se(mixed) == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    disagree = study.pool(run([["a", 0, True], ["b", 1, False]]), run([["a", 1000, False], ["b", 1001, True]]))
    assert disagree["se"] == pytest.approx(0.0)  # each prompt half the time: no spread between prompts
    old = {k: v for k, v in run(draw(0)).items() if k != "outcomes"}  # a summary from before outcomes were kept
    assert study.pool(old, run(draw(1000)))["se"] == pytest.approx((0.25 / 4) ** 0.5)


def test_lift_over_none_pairs_the_same_draws_by_hand(tmp_path):
    """Prompt a succeeds under the attack on both draws and never as given, prompt b never: differences
    a: 1, 1 and b: 0, 0, so lift 0.5 and SE sqrt(1^2 + 1^2) / 4 = 0.354. A draw only one cell has is left out;
    the table and study.json carry the lifts, and the erasure's lift over the base pairs the same attack."""
    def cell(outcomes):
        wins = sum(y for *_, y in outcomes)
        return {"asr": wins / len(outcomes), "se": 0.0, "successes": wins, "n": len(outcomes), "missing": 0,
                "pre_attack_successes": 0, "mean_first_success": None, "seconds_per_prompt": 1.0,
                "outcomes": outcomes}

    attacked = cell([["a", 0, True], ["a", 1000, True], ["b", 1, False], ["b", 1001, False], ["c", 2, True]])
    none = cell([["a", 0, False], ["a", 1000, False], ["b", 1, False], ["b", 1001, False]])
    got = study.paired_lift(attacked, none)
    assert got["n"] == 4 and got["lift"] == pytest.approx(0.5) and got["se"] == pytest.approx(2 ** 0.5 / 4)
    assert study.paired_lift(attacked, {k: v for k, v in none.items() if k != "outcomes"}) is None
    results = {"stripes": {"base": {"attacks": {"none": none, "p4d-k": attacked}},
                           "ca": {"attacks": {"none": none, "p4d-k": none}}}}
    lifted = study.lifts(results, ["none", "p4d-k"])
    assert lifted["stripes"]["base"]["p4d-k"]["over_base"] is None
    assert lifted["stripes"]["ca"]["p4d-k"]["over_none"]["lift"] == 0.0
    assert lifted["stripes"]["ca"]["p4d-k"]["over_base"]["lift"] == pytest.approx(-0.5)
    assert "| stripes | base | +0.50 ± 0.35 |" in study.lift_table(lifted, ["none", "p4d-k"])
    settings = study.StudySettings(out=str(tmp_path), concepts=("stripes",), attacks=("none", "p4d-k"))
    doc = study.write_study(settings, [], results, [])
    assert "+0.50 ± 0.35" in (tmp_path / "study.md").read_text()
    assert doc["lifts"]["stripes"]["ca"]["p4d-k"]["over_base"]["n"] == 4
    assert "outcomes" not in doc["results"]["stripes"]["base"]["none"]  # the records keep them


def test_unknown_names_and_limit_are_one_line_errors():
    with pytest.raises(ValueError, match="--concepts dots: unknown concept"):
        study.StudySettings(concepts=("dots",))
    with pytest.raises(ValueError, match="--erasures esd: unknown erasure"):
        study.StudySettings(erasures=("esd",))
    with pytest.raises(ValueError, match="--limit 0"):
        study.StudySettings(limit=0)


def _tiny_delta(path: Path) -> Path:
    """A real-format pruned delta of the toy model: one ff.net.2 weight with its first half of rows zeroed."""
    from ldm.checkpoint import load_state_dict, save_state_dict

    sd = load_state_dict(asset_paths(ASSETS)["weights"])
    key = next(k for k in sd if k.endswith("ff.net.2.weight"))
    w = sd[key].clone()
    w[: w.shape[0] // 2] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict({key: w}, path)
    return path


def test_tiny_run_reuses_cached_erasure_and_writes_the_table(tmp_path):
    out = tmp_path / "study"
    delta = _tiny_delta(out / "erasures" / "cp.safetensors")
    (out / "erasures" / "erasures.json").write_text(json.dumps({"stripes/cp": str(delta)}))
    attacks = ("none", "ring_a_bell", "inversion")
    s = study.StudySettings(out=str(out), concepts=("stripes",), erasures=("cp",), attacks=attacks, limit=1,
                            steps=2, overrides=("ring_a_bell.population=2", "ring_a_bell.generations=1",
                                                "inversion.steps=1"))
    doc = study.run(s)
    # the cached delta was attacked as "cp" (no training or pruning ran: erasures.json is unchanged)
    assert json.loads((out / "erasures" / "erasures.json").read_text()) == {"stripes/cp": str(delta)}
    for model in ("base", "cp"):
        for attack in attacks:
            summary = doc["results"]["stripes"][model][attack]
            assert summary["n"] == 1 and summary["missing"] == 0 and summary["seconds_per_prompt"] > 0
            assert len(list((out / "attacks" / "toy_stripes" / model / attack).glob("*.json"))) == 1
    md, _, lifted = (out / "study.md").read_text().partition("\n\n")
    md = md.splitlines()
    assert md[0] == "| concept | model | none (pre-attack) | ring_a_bell | inversion |"
    assert [line.split(" | ")[:2] for line in md[2:]] == [["| stripes", "base"], ["| stripes", "cp"]]
    assert lifted.startswith("Lift over `none`") and "| stripes | cp | " in lifted  # each attack minus none
    lift = doc["lifts"]["stripes"]["cp"]["ring_a_bell"]["over_none"]["lift"]
    assert lift == doc["results"]["stripes"]["cp"]["ring_a_bell"]["asr"] - asr_of(doc, "cp", "none")
    asr = doc["results"]["stripes"]["cp"]["none"]["asr"]
    assert md[3].split(" | ")[2].startswith(f"{asr:.2f} ± 0.00 (1) · ")
    saved = json.loads((out / "study.json").read_text())
    assert saved["budgets"] == study.BUDGETS and saved["study"]["overrides"] == list(s.overrides)
    # the record of the budget actually used: the --set values after the study's budgets
    record = json.loads(next((out / "attacks" / "toy_stripes" / "cp" / "ring_a_bell").glob("*.json")).read_text())
    assert record["settings"]["attack"]["generations"] == 1 and record["settings"]["attack"]["population"] == 2
    assert record["extra"]["search"] == "shared"  # ConceptPrune keeps the text encoder: the base's search serves

    # --report: a larger study read from the records there are, attacking and training nothing. Its second prompt
    # and second offset have no record (cells "1 of 4"), "ca" is not made and the waves base not built: left out.
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in ("study.md", "study.json"))
    larger = dataclasses.replace(s, concepts=("stripes", "waves"), erasures=("ca", "cp"), limit=2, seeds=(0, 1000))
    got = study.report(larger)
    assert sorted(p for p in out.rglob("*") if p.is_file() and p.name not in ("study.md", "study.json")) == files
    assert got["report"] is True and list(got["results"]) == ["stripes"]
    assert list(got["results"]["stripes"]) == ["base", "cp"]
    cell = got["results"]["stripes"]["cp"]["none"]
    assert (cell["n"], cell["missing"], cell["asr"]) == (1, 3, asr)
    assert f"{asr:.2f} ± 0.00 (1 of 4) · " in (out / "study.md").read_text()
    whole = study.report(dataclasses.replace(larger, limit=1), complete=True)  # offset 1000 has no record yet
    assert whole["results"] == {} and whole["left_out"] == [
        "stripes seed offset 0: not complete", "stripes seed offset 1000: not complete",
        "waves seed offset 0: its base is not built yet", "waves seed offset 1000: its base is not built yet"]
    alone = study.report(dataclasses.replace(s, erasures=("cp",)), complete=True)  # the run above: all done
    assert alone["left_out"] == [] and alone["results"]["stripes"]["cp"]["none"]["n"] == 1


def test_publish_fills_the_marked_block_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.md").write_text("| a |\n|---|\n| 1 |\n")
    (out / "study.json").write_text("{}\n")
    page = tmp_path / "page.md"
    page.write_text(f"# title\n\nbefore\n{study.MARKERS[0]}\nold\n{study.MARKERS[1]}\nafter\n")
    study.publish(out, page, tmp_path / "assets")
    start, end = study.MARKERS
    assert page.read_text() == f"# title\n\nbefore\n{start}\n| a |\n|---|\n| 1 |\n{end}\nafter\n"
    assert (tmp_path / "assets" / "attacks" / "study.md").read_text() == "| a |\n|---|\n| 1 |\n"
    page.write_text("no markers\n")
    with pytest.raises(ValueError, match="no <!-- attack-study table: start -->"):
        study.publish(out, page, tmp_path / "other")
    assert not (tmp_path / "other").exists() and page.read_text() == "no markers\n"  # nothing half-written


def test_paired_sampler_difference_by_hand():
    a = [True, True, False, False, True]   # plms: 3/5
    b = [True, False, True, True, True]    # dpmpp_2m: 4/5; d = 0, -1, 1, 1, 0
    r = study.paired(a, b)
    assert r["n"] == 5 and r["asr"] == [0.6, 0.8] and (r["only_first"], r["only_second"]) == (1, 2)
    assert r["se"][0] == pytest.approx((0.6 * 0.4 / 5) ** 0.5) and r["difference"] == pytest.approx(0.2)
    # sd of (0, -1, 1, 1, 0) around 0.2: sqrt((0.04 + 1.44 + 0.64 + 0.64 + 0.04) / 4) = sqrt(0.7)
    assert r["difference_se"] == pytest.approx(0.7 ** 0.5 / 5 ** 0.5)
    with pytest.raises(ValueError, match="same rows"):
        study.paired([True], [True, False])


def test_sampler_study_needs_a_made_erasure(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        study.main(["--out", str(tmp_path / "o"), "--concepts", "stripes", "--compare_samplers", "ca"])
    assert e.value.code == 2
    assert "--compare_samplers ca: no 'stripes' erasure 'ca' made in" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_waves_preserve_prompts_are_found_from_a_relative_out(tmp_path, monkeypatch):
    """The waves ca-preserve erasure names its preservation prompts by a path that exists, also when --out is
    relative (the mission puts ``assets /`` in front of a relative one)."""
    from experiments import attack_study as st

    monkeypatch.chdir(tmp_path)
    e = next(x for x in st.erasures_for("waves") if x.name == "ca-preserve")
    settings = st.erasure_train_settings(e, Path("outputs/study"), "base.safetensors")
    preserve = Path(settings.preserve_prompts)
    assert preserve.is_absolute() and preserve.is_file()
    assert preserve == (tmp_path / "outputs/study/erasures/preserve_waves.txt")
    assert "waves" not in preserve.read_text()


def asr_of(doc, model, attack, concept="stripes"):
    return doc["results"][concept][model][attack]["asr"]


def test_compare_samplers_pairs_each_sampler_with_the_first(tmp_path):
    """Three samplers on the same rows: ASRs and seconds per sampler from the job's records, each other sampler
    paired with the first (the original's lms); a sampler named twice is refused before any check."""
    with pytest.raises(ValueError, match="two or more different samplers"):
        study.compare_samplers(tmp_path / "x", "stripes", samplers=("lms", "lms"))
    r = study.compare_samplers(tmp_path / "o", "stripes", samplers=("lms", "plms", "dpmpp_2m"), seeds=(0,), limit=2,
                               steps=4)
    assert r["reference"] == "lms" and r["n"] == 2 and set(r["paired"]) == {"plms", "dpmpp_2m"}
    for k in ("lms", "plms", "dpmpp_2m"):
        recs = sorted((tmp_path / "o" / "samplers" / k / "toy_stripes" / "base" / "none").glob("*.json"))
        wins = [json.loads(p.read_text())["success"] for p in recs]
        assert len(wins) == 2 and r["asr"][k] == sum(wins) / 2 and r["seconds_per_check"][k] > 0
        if k != "lms":
            assert r["paired"][k]["asr"] == [r["asr"]["lms"], r["asr"][k]]
    saved = json.loads((tmp_path / "o" / "samplers" / "stripes-base.json").read_text())
    assert saved["paired"] == r["paired"]
