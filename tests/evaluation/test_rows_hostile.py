"""Hostile prompt-set rows and list flags (issue 30, items 5, 6, 7 and 12): each class is refused when the set or the
command line is read, as one line naming the file and line (or the flag), exit status 2, and nothing generated.

The benchmark runs are ``benchmark.py``'s ``main`` on the toy world (as tests/evaluation/test_benchmark.py), so a
refusal is proven to come before any model is built or any image is made."""
import csv
import json
from pathlib import Path

import pytest

from evaluation import benchmark as bench
from evaluation import prompt_sets as ps
from evaluation.settings import BenchmarkSettings
from evaluation.suites import SUITES
from runtime import cli
from runtime.generate import Sampling
from toyworld.mission import asset_paths

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets/toyworld"
I2P_HEADER = ["prompt", "categories", "hard", "evaluation_seed", "evaluation_guidance", "sd_image_width",
              "sd_image_height"]


def _toy_argv(out: Path) -> list[str]:
    p = asset_paths(ASSETS)
    return ["--base", str(p["weights"]), "--config", str(p["config"]), "--outdir", str(out), "--H", "32", "--W", "32",
            "--clip_model", str(p["clip"]), "--steps", "10", "--precision", "full", "--score_device", "cpu",
            "--gpus", "cpu"]


def _write_i2p(path: Path, rows) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(I2P_HEADER)
        w.writerows(rows)
    return path


def _refused(argv, capsys, *needles) -> str:
    """``benchmark.py`` refuses ``argv``: exit status 2, one stderr line holding every needle."""
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _nothing_generated(out: Path) -> None:
    assert not out.exists() or not any(p.suffix == ".png" for p in out.rglob("*")), list(out.rglob("*"))


# ------------------------------------------------------------------ item 5: per-row settings and the size/scale flags
GOOD = ["a red circle", "sexual", "0", "7", "7.5", "32", "32"]


@pytest.mark.parametrize("column,value", [
    ("evaluation_seed", str(2 ** 63)),
    ("evaluation_seed", "-1"),
    ("evaluation_guidance", "1e308"),
    ("evaluation_guidance", "-101"),
    ("sd_image_width", "99999992"),
    ("sd_image_height", "4104"),
    ("sd_image_width", "12"),
])
def test_out_of_range_row_settings_refused_with_line(tmp_path, capsys, column, value):
    bad = list(GOOD)
    bad[I2P_HEADER.index(column)] = value
    i2p = _write_i2p(tmp_path / "i2p.csv", [GOOD, GOOD, bad, GOOD])  # the bad row starts on line 4
    out = tmp_path / "out"
    err = _refused(["nudity", "--prompts", str(i2p), "--row_settings", *_toy_argv(out)], capsys,
                   "i2p.csv: line 4", column, value)
    assert "must be" in err
    _nothing_generated(out)


def test_row_settings_at_the_limits_are_read(tmp_path):
    edge = ["a cat", "sexual", "0", str(2 ** 63 - 1), "-100", "4096", "8"]
    rows = ps.read_i2p(_write_i2p(tmp_path / "i2p.csv", [edge]), row_settings=True)
    assert (rows[0].seed, rows[0].guidance, rows[0].width, rows[0].height) == (2 ** 63 - 1, -100.0, 4096, 8)


def test_object_csv_seed_out_of_range_names_the_line(tmp_path):
    path = tmp_path / "objects.csv"
    path.write_text(f"case_number,prompt,evaluation_seed,class\n0,an image of a church,1,church\n"
                    f"1,an image of a church,{2 ** 64},church\n")
    with pytest.raises(ps.PromptSetError, match="objects.csv: line 3: bad evaluation_seed value '1844674407370955161"):
        ps.read_object_csv(path)
    with pytest.raises(ps.PromptSetError, match="out of range"):
        ps.gender_rows(["doctor"], seeds=[2 ** 63])


def test_seed_limit_is_what_the_image_generator_takes():
    """SEED_LIMIT is the generator's: torch accepts every seed below it (and generate_images refuses the rest)."""
    import torch

    torch.Generator().manual_seed(cli.SEED_LIMIT - 1)
    assert cli.seed_problem(cli.SEED_LIMIT - 1) is None and cli.seed_problem(cli.SEED_LIMIT)


@pytest.mark.parametrize("flag,value", [("--H", "99999992"), ("--W", "4104"), ("--scale", "1e308"),
                                        ("--scale", "-100.5"), ("--scale", "nan")])
def test_size_and_scale_flags_bounded_in_every_command(flag, value, capsys):
    from evaluation import protocol
    from prune import jobs as conceptprune
    from runtime import sample

    parsers = {"benchmark": bench.build_parser(), "sample": sample.build_parser(),
               "evaluate": protocol.build_parser(), "conceptprune discover": conceptprune.build_parser()}
    prefix = {"conceptprune discover": ["discover", "--concept", "x"], "benchmark": ["nudity"]}
    for name, parser in parsers.items():
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*prefix.get(name, []), flag, value])
        assert e.value.code == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err and ("must be" in err or "finite" in err), (name, err)


def test_seed_flags_bounded(capsys):
    from runtime import sample

    with pytest.raises(SystemExit) as e:
        sample.build_parser().parse_args(["--seed", str(2 ** 63)])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err


@pytest.mark.parametrize("change,match", [(dict(height=4104), "height must be a multiple of 8 from 8 to 4096"),
                                          (dict(scale=1e308), "scale must be a finite number"),
                                          (dict(scale=float("nan")), "scale must be a finite number"),
                                          (dict(seed=2 ** 63), "seed must be an integer from 0")])
def test_sampling_validate_applies_the_same_limits(change, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**change).validate()
    Sampling(height=4096, width=8, scale=-100.0, seed=2 ** 63 - 1).validate()


# ------------------------------------------------------------------ item 6: an unterminated quote
def test_unterminated_quote_refused_with_its_line(tmp_path, capsys):
    i2p = tmp_path / "i2p.csv"
    i2p.write_text("prompt,categories\na red circle,sexual\n\"a blue cat,sexual\na green star,violence\n"
                   "a yellow sun,sexual\n")
    out = tmp_path / "out"
    _refused(["nudity", "--prompts", str(i2p), *_toy_argv(out)], capsys, "i2p.csv: line 3", "never closed")
    _nothing_generated(out)


def test_unterminated_quote_every_csv_reader(tmp_path):
    """The one CSV reader of the prompt sets refuses it for every set; quotes that close (a quoted line break,
    ``""``, text after a closing quote, a quote inside an unquoted field) still read as pandas reads them."""
    mma = tmp_path / "mma.csv"
    mma.write_text('adv_prompt\nok\n"a ""quoted"" word\n')
    with pytest.raises(ps.PromptSetError, match="mma.csv: line 3: a quoted field opens here and is never closed"):
        ps.read_mma(mma)
    obj = tmp_path / "obj.csv"
    obj.write_text('prompt,class,evaluation_seed\n"an image of a church,church,1\n')
    with pytest.raises(ps.PromptSetError, match="obj.csv: line 2"):
        ps.read_object_csv(obj)
    rab = tmp_path / "rab.csv"
    rab.write_text('one\n"two\nthree\n')
    with pytest.raises(ps.PromptSetError, match="rab.csv: line 2"):
        ps.read_ring_a_bell(rab, headerless="csv")
    fine = tmp_path / "fine.csv"
    fine.write_text('adv_prompt\n"a two-line\nprompt"\n"say ""hi"""\n"abc"def\na 5" screen\n')
    assert [r.prompt for r in ps.read_mma(fine)] == ["a two-line prompt", 'say "hi"', "abcdef", 'a 5" screen']


# ------------------------------------------------------------------ item 7: empty lists
@pytest.mark.parametrize("flag", ["--professions", "--categories"])
@pytest.mark.parametrize("value", [",,", "", " , "])
def test_empty_comma_list_flags_refused(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    _refused(["gender", flag, value, *_toy_argv(out)], capsys, flag, "at least one item")
    _nothing_generated(out)


def test_comma_list_is_the_one_parser():
    assert cli.comma_list(" sexual, violence ,") == ["sexual", "violence"]
    assert cli.comma_list("a,,b") == ["a", "b"]
    parser = bench.build_parser()
    for flag in ("--professions", "--categories"):
        assert next(a for a in parser._actions if flag in a.option_strings).type is cli.comma_list


def test_empty_professions_from_python_are_not_the_default(tmp_path):
    settings = BenchmarkSettings(suites=("gender",), professions=())
    with pytest.raises(ps.PromptSetError, match="no professions"):
        SUITES["gender"].rows(settings)
    assert len(SUITES["gender"].rows(BenchmarkSettings(suites=("gender",), gender_seeds=1))) == len(ps.PROFESSIONS)


# ------------------------------------------------------------------ item 12: empty prompts
@pytest.mark.parametrize("prompt", ["", "   ", "\t \n "])
def test_empty_i2p_prompt_refused_with_line(tmp_path, capsys, prompt):
    i2p = _write_i2p(tmp_path / "i2p.csv", [GOOD, [prompt, *GOOD[1:]], GOOD])
    out = tmp_path / "out"
    _refused(["nudity", "--prompts", str(i2p), *_toy_argv(out)], capsys, "i2p.csv: line 3: empty prompt",
             "--empty_prompts skip")
    _nothing_generated(out)


def test_empty_mma_prompt_refused_with_line(tmp_path, capsys):
    mma = tmp_path / "mma.csv"
    mma.write_text("target_prompt,adv_prompt\na,a red circle\nb,  \n")
    out = tmp_path / "out"
    _refused(["nudity", "--prompt_set", "mma", "--prompts", str(mma), *_toy_argv(out)], capsys,
             "mma.csv: line 3: empty adv_prompt")
    _nothing_generated(out)


def test_empty_prompts_of_other_sets_refused(tmp_path):
    art = tmp_path / "test_stripes.csv"
    art.write_text("prompt,evaluation_seed\na striped wall,1\n ,2\n")
    with pytest.raises(ps.PromptSetError, match="test_stripes.csv: line 3: empty prompt"):
        ps.artist_rows(str(art))
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": 1, "id": 5, "caption": "a cat"},
                                                {"image_id": 2, "id": 9, "caption": " "}]}))
    with pytest.raises(ps.PromptSetError, match=r"annotation 1 \(id 9\) has an empty caption"):
        ps.read_captions(coco)
    mem = tmp_path / "mem.jsonl"
    mem.write_text('{"caption": "a cat", "index": 0}\n{"caption": "", "index": 1}\n')
    with pytest.raises(ps.PromptSetError, match="mem.jsonl: line 2: empty caption"):
        ps.read_memorization(mem, check_gt=False)


def test_empty_prompts_skip_leaves_them_out_and_counts_them(tmp_path, capsys):
    """--empty_prompts skip: the empty rows are left out (nothing unconditional generated), the others keep their
    ids, and the nudity summary says how many were skipped."""
    i2p = _write_i2p(tmp_path / "i2p.csv", [GOOD, ["", *GOOD[1:]], ["a blue cat", *GOOD[1:]], [" ", *GOOD[1:]]])
    out = tmp_path / "out"
    assert bench.main(["nudity", "--prompts", str(i2p), "--empty_prompts", "skip", *_toy_argv(out)]) == 0
    assert "left out 2 empty prompts" in capsys.readouterr().err
    summary = json.loads((out / "nudity/summary.json").read_text())["models"]["base"]
    assert summary["skipped_empty_prompts"] == 2 and summary["n_images"] == 2
    records = [json.loads(x) for x in (out / "nudity/records/base.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prompt"]) for r in records] == [("i2p-00000", "a red circle"), ("i2p-00002", "a blue cat")]
    assert len(list(out.rglob("*.png"))) == 2 + 1  # two images and the summary plot
    # every row empty: nothing to generate, one line
    empty = _write_i2p(tmp_path / "empty.csv", [["", *GOOD[1:]]])
    _refused(["nudity", "--prompts", str(empty), "--empty_prompts", "skip", *_toy_argv(tmp_path / "o2")], capsys,
             "every prompt left is empty (1 skipped")
