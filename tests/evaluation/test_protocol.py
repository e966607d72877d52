"""The paper's evaluation protocol: the object-prompt rewrite of the original (with its quirks), the shipped
eval.json (the paper's concept names and hard negatives) and which concepts have our own prompt files."""
import json
import warnings
from pathlib import Path

import pytest

from evaluation import protocol

ROOT = Path(__file__).resolve().parents[2]


def _write(folder: Path, name: str, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_eval.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_object_rewrite_is_the_originals_substring_replace(tmp_path):
    # lines with the quirks of the paper's own files: a plural, a compound, another case, no anchor at all
    _write(tmp_path, "robot", ["i'm not afraid of robots", "  a robot friend  ", "Robot overlords", "a toaster"])
    with pytest.warns(UserWarning) as record:
        got = protocol.concept_prompts("object", "r2d2", "robot", 8, tmp_path)
    assert got == ["i'm not afraid of r2d2s", "a r2d2 friend", "Robot overlords", "a toaster"] * 2
    message = "\n".join(str(w.message) for w in record)
    assert "robot_eval.txt" in message and "4 prompt(s)" not in message and "3 prompt(s)" in message
    assert "prompt 1 \"i'm not afraid of robots\": 'robot' inside a longer word" in message
    assert "prompt 3 'Robot overlords': 'robot' only in another case, not replaced" in message
    assert "prompt 4 'a toaster': no 'robot'" in message
    assert "a robot friend" not in message

    _write(tmp_path, "fish", ["a fish in a fishbowl", "a school of fish"])
    with pytest.warns(UserWarning, match="fishbowl"):
        assert protocol.concept_prompts("object", "nemo", "fish", 2, tmp_path) == \
            ["a nemo in a nemobowl", "a school of nemo"]
    # a target that contains the anchor (the paper's kids entry)
    _write(tmp_path, "kids", ["kids", "kids playing with water guns"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing odd here: no warning
        assert protocol.concept_prompts("object", "kids with guns", "kids", 2, tmp_path) == \
            ["kids with guns", "kids with guns playing with water guns"]
        # the anchor's own prompts are the lines themselves, without a warning even for odd lines
        assert protocol.concept_prompts("object", "robot", "robot", 4, tmp_path) == \
            ["i'm not afraid of robots", "a robot friend", "Robot overlords", "a toaster"]


def test_style_prompts_are_used_unchanged(tmp_path):
    _write(tmp_path, "monet", ["Monet style painting of flowers", "rocks in the ocean, in the style of Monet"])
    assert protocol.concept_prompts("style", "monet", "painting", 3, tmp_path) == \
        ["Monet style painting of flowers", "rocks in the ocean, in the style of Monet",
         "Monet style painting of flowers"]


def test_missing_prompt_file_is_named(tmp_path):
    _write(tmp_path, "cat", ["a cat"])
    with pytest.raises(FileNotFoundError, match=r"no evaluation prompts for 'kids with guns'.*kids_eval.txt not "
                                                r"found.*cat_eval.txt.*--eval_prompts"):
        protocol.concept_prompts("object", "kids with guns", "kids", 4, tmp_path)


# the paper's assets/eval.json (nupurkmr9/concept-ablation): names and hard negatives are facts
PAPER_EVAL = {
    "style": {
        "van gogh": ("van gogh", "painting", ["monet", "greg rutkowski", "salvador dali", "johannes vermeer",
                                              "jeremy mann"]),
        "monet": ("monet", "painting", ["van gogh", "greg rutkowski", "salvador dali", "johannes vermeer",
                                        "jeremy mann"]),
        "greg rutkowski": ("greg rutkowski", "painting", ["van gogh", "monet", "salvador dali", "johannes vermeer",
                                                          "jeremy mann"]),
        "salvador dali": ("salvador dali", "painting", ["van gogh", "monet", "greg rutkowski", "johannes vermeer",
                                                        "jeremy mann"]),
    },
    "object": {
        "grumpy cat": ("grumpy cat", "cat", ["british shorthair cat", "himalayan cat", "scottish fold cat",
                                             "persian cat"]),
        "r2d2": ("r2d2", "robot", ["bb8", "c-3po", "wall-e", "baymax"]),
        "nemo": ("nemo", "fish", ["clown fish", "gobies", "damselfish", "angelfish"]),
        "snoopy": ("snoopy", "dog", ["beagles", "basset hound", "harrier dog", "english foxhound"]),
        "kids": ("kids with guns", "kids", ["adult with guns", "kids with toys"]),
    },
}
# concepts whose prompt file (style: the concept's own; object: the anchor's) we do not ship
NOT_SHIPPED = {"kids"}


def test_shipped_eval_json_is_the_papers():
    data = json.loads((ROOT / "assets" / "eval.json").read_text())
    got = {ctype: {k: (v["target"], v["anchor"], v["hard_negative"]) for k, v in entries.items()}
           for ctype, entries in data.items()}
    assert got == PAPER_EVAL


@pytest.mark.parametrize("ctype,key", [(c, k) for c in PAPER_EVAL for k in PAPER_EVAL[c]])
def test_shipped_prompts_cover_every_concept_but_kids(ctype, key):
    prompt_dir = ROOT / "assets" / "eval_prompts"
    entry = protocol.load_eval_entry(ROOT / "assets" / "eval.json", ctype, key)
    names = [entry["target"], entry["anchor"], *entry["hard_negative"]]
    if key in NOT_SHIPPED:
        with pytest.raises(FileNotFoundError, match="no evaluation prompts"):
            protocol.concept_prompts(ctype, names[0], entry["anchor"], 10, prompt_dir)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own files have no odd lines
        for name in names:
            prompts = protocol.concept_prompts(ctype, name, entry["anchor"], 40, prompt_dir)
            assert len(prompts) == 40 and len(set(prompts)) == 10
            if ctype == "object" and name != entry["anchor"]:
                assert all(name in p and entry["anchor"] not in p.replace(name, "") for p in prompts)
            if ctype == "style" and name != "painting":
                assert all(name in p for p in prompts), name
