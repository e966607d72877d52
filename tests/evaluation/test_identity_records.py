"""benchmark.py and evaluate.py refuse a generation folder whose own records are damaged (a folder's ``plan.json``,
evaluate.py's ``base_model.json``) with one line naming the file, what is wrong and what to do, exit status 2,
before any model is built and with nothing touched: these are not caches, so they are never guessed
(runtime.files.read_json; the runtime side is tests/runtime/test_identity_files.py)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_evaluate import env, evaluate_argv  # noqa: F401 (its tiny evaluate.py set-up)

from evaluation import benchmark as bench
from evaluation import protocol
from experiments import toy_benchmark as toy
from runtime.generate import PLAN_FILE

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets/toyworld"
TRUNCATED = b'{"prompts": ["a painting of stripes"], "steps'


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from runtime.delta import save_delta

    out = tmp_path_factory.mktemp("identity")
    sets = toy.write_prompt_sets(out / "sets", rows_per_class=1, n_captions=2)
    sd = load_file(str(ASSETS / "ldm/toyworld-ldm.safetensors"))
    save_delta(out / "zero_ffn.safetensors",
               {k: torch.zeros_like(v) for k, v in sd.items() if k.endswith("ff.net.2.weight")})
    return out, sets


def _bench_argv(world, outdir) -> list[str]:
    out, sets = world
    p = toy.asset_paths(ASSETS)
    argv = ["artist", "--base", str(p["weights"]), "--config", str(p["config"]), "--outdir", str(outdir),
            "--H", "32", "--W", "32", "--steps", "2", "--limit", "1", "--precision", "full", "--batch_size", "8",
            "--clip_model", str(p["clip"]), "--score_device", "cpu", "--delta", f"zero={out / 'zero_ffn.safetensors'}"]
    for a in sets["artists"]:
        argv += ["--artist", str(a)]
    return argv


def test_benchmark_refuses_a_damaged_plan_of_a_folder(world, tmp_path, capsys):
    outdir = tmp_path / "bench"
    argv = _bench_argv(world, outdir)
    plan = bench.check(bench.parse_argv(argv))
    spec = plan.models[1]  # the delta's folder: the base's is made first, so a refusal there would prove less
    folder = plan.layout.folders(plan, "artist", spec)[0][0]
    (folder / "samples").mkdir(parents=True)
    (folder / PLAN_FILE).write_bytes(TRUNCATED)
    before = _tree(outdir)
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: the generation plan {folder / PLAN_FILE} is damaged (not valid JSON: "
                           f"Unterminated string"), line
    assert line.endswith(f"its folder {folder} cannot be resumed: delete it"), line
    assert _tree(outdir) == before  # no image of the base either, and no lock left behind


def test_evaluate_refuses_a_damaged_base_model_record(env, tmp_path, capsys):  # noqa: F811 (the imported fixture)
    argv = evaluate_argv(env)
    argv[argv.index("--outpkl") + 1] = str(tmp_path / "metrics" / "evaluation.pkl")
    argv[argv.index("--base_outpath") + 1] = str(tmp_path / "baseline")
    the_plan = protocol.plan(protocol.parse_settings(argv))
    folder = protocol.base_dir(the_plan, the_plan.concepts[0])
    (folder / "samples").mkdir(parents=True)
    (folder / "samples" / "00000.png").write_bytes(b"an image made by some base model")
    (folder / protocol.BASE_META).write_text("[]")
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as e:
        protocol.main(argv)
    assert e.value.code == 2
    line = _error_line(capsys)
    assert line == (f"error: the base-model record {folder / protocol.BASE_META} is damaged (a JSON array where an "
                    f"object was written); which base model made the images of {folder} is unknown: delete that "
                    f"folder, or use another --base_outpath"), line
    assert _tree(tmp_path) == before


def test_evaluate_refuses_another_base_models_folder_before_any_work(env, tmp_path, capsys):  # noqa: F811
    """The same check, found now instead of at the base folder's turn in the generation."""
    argv = evaluate_argv(env)
    argv[argv.index("--outpkl") + 1] = str(tmp_path / "metrics" / "evaluation.pkl")
    argv[argv.index("--base_outpath") + 1] = str(tmp_path / "baseline")
    the_plan = protocol.plan(protocol.parse_settings(argv))
    folder = protocol.base_dir(the_plan, the_plan.concepts[0])
    folder.mkdir(parents=True)
    (folder / protocol.BASE_META).write_text('{"base_ckpt": "/elsewhere/other.ckpt"}\n')
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as e:
        protocol.main(argv)
    assert e.value.code == 2
    assert "caches generations of another base model (/elsewhere/other.ckpt" in _error_line(capsys)
    assert _tree(tmp_path) == before
