"""``python -m experiments.toy_attacks``: the attack job on the toy world for several concepts, one table."""
from __future__ import annotations

import json

import pytest

from experiments import toy_attacks


def test_two_concepts_one_table(tmp_path):
    out = tmp_path / "out"
    results = toy_attacks.main(["--concepts", "stripes", "grumpy cat", "--steps", "10", "--limit", "2",
                                "--out", str(out)])
    assert set(results) == {"stripes", "grumpy cat"}
    header = (out / "results.md").read_text().splitlines()[0]
    assert "toy:grumpy cat: pre-attack ASR (none)" in header and "toy:stripes: pre-attack ASR (none)" in header
    table = json.loads((out / "results.json").read_text())
    for c in ("stripes", "grumpy cat"):
        assert table["base"][f"toy:{c}: pre-attack ASR (none)"] == results[c]["base"]["none ASR"]
        assert len(list((out / f"toy_{c.replace(' ', '_')}" / "base" / "none").glob("*.json"))) == 2


def test_inputs_checked_before_any_concept_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        toy_attacks.main(["--concepts", "stripes", "waves", "--delta", "x=missing.safetensors", "--out",
                          str(tmp_path / "out")])
    assert e.value.code == 2 and "--delta x=missing.safetensors: file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
