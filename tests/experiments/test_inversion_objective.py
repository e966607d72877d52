"""experiments.inversion_objective: the paired table against a hand computation, common random numbers across
words, and a bad folder refused before the model loads."""
import numpy as np
import pytest
import torch

from experiments import inversion_objective as io


def test_paired_table_against_a_hand_computation():
    losses = {"stripes": np.array([1.0, 2.0, 3.0]), "art": np.array([0.5, 1.0, 2.5])}
    rows = {r["word"]: r for r in io.paired_table(losses, "stripes")}
    d = np.array([-0.5, -1.0, -0.5])
    assert rows["art"]["minus_concept"] == pytest.approx(d.mean())
    assert rows["art"]["se"] == pytest.approx(np.sqrt(((d - d.mean()) ** 2).sum() / 2) / np.sqrt(3))
    assert rows["stripes"]["minus_concept"] == 0.0 and rows["art"]["loss"] == pytest.approx(4 / 3)
    assert [r["word"] for r in io.paired_table(losses, "stripes")] == ["art", "stripes"]  # lowest loss first


def test_every_word_gets_the_same_draws():
    """Two spellings of one prompt text give identical losses draw by draw: the draws (t, noise, posterior sample)
    do not depend on the word, so differences between words are the words' alone."""
    from ldm.util import load_model_config
    from runtime.loading import load_model

    model = load_model(load_model_config(io.ASSETS / "ldm" / "ldm.yaml"),
                       io.ASSETS / "ldm" / "toyworld-ldm.safetensors").eval()
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    torch.manual_seed(0)
    out = io.objective(model, images, ["stripes", "stripes ", "art"], repeats=2)
    assert len(out["stripes"]) == 2 * 19  # two draws of each of the 19 style templates
    np.testing.assert_array_equal(out["stripes"], out["stripes "])  # the tokenizer strips the space
    assert not np.array_equal(out["stripes"], out["art"])


def test_a_token_with_a_words_embedding_scores_as_that_word():
    """A learned token measured like a word: the embedding of "stripes" put in the token's slot gives the word's
    own losses, draw by draw, in the given templates."""
    from attacks.text import content_ids, token_embedding_matrix
    from ldm.util import load_model_config
    from runtime.loading import load_model

    model = load_model(load_model_config(io.ASSETS / "ldm" / "ldm.yaml"),
                       io.ASSETS / "ldm" / "toyworld-ldm.safetensors").eval()
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    enc = model.cond_stage_model
    vec = token_embedding_matrix(enc)[content_ids(enc, "stripes")].detach().clone()
    out = io.objective(model, images, ["stripes", "art"], repeats=2, templates=("{} style", "in the style of {}"),
                       tokens={"token": vec})
    assert len(out["token"]) == 2 * 2
    np.testing.assert_allclose(out["token"], out["stripes"], rtol=1e-5)
    assert not np.allclose(out["token"], out["art"])


def test_a_folder_without_images_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        io.main(["--concept", "stripes", "--targets", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no PNG images" in err[0]


def test_captions_must_match_the_images(tmp_path, capsys):
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{i:05d}.png")
    captions = tmp_path / "captions.txt"
    captions.write_text("a painting of a red circle, in the style of {}\n")  # one line for two images
    with pytest.raises(SystemExit) as e:
        io.main(["--concept", "stripes", "--targets", str(tmp_path), "--captions", str(captions)])
    assert e.value.code == 2
    assert "needs one line per image (2)" in capsys.readouterr().err


def _one_image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "targets"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "00000.png")
    return folder


@pytest.mark.parametrize("kind, message", [
    ("not safetensors", "not a safetensors file"),
    ("no vectors", "no float 'vectors' [k, D] in it (keys: losses)"),
    ("wrong width", "vectors of width 5, the model's text encoder has"),
])
def test_a_bad_token_file_is_one_line_exit_2(tmp_path, capsys, kind, message):
    """Anything but concept inversion's kept token (with the model's width) is refused in one line, not a
    traceback from safetensors or from the encoder."""
    from safetensors.torch import save_file

    token = tmp_path / "prepared.safetensors"
    if kind == "not safetensors":
        token.write_text("not a tensor file\n")
    elif kind == "no vectors":
        save_file({"losses": torch.zeros(3)}, str(token))
    else:
        save_file({"vectors": torch.zeros(1, 5), "losses": torch.zeros(3)}, str(token))
    out = tmp_path / "rows.json"
    with pytest.raises(SystemExit) as e:
        io.main(["--concept", "stripes", "--targets", str(_one_image_folder(tmp_path)),
                 "--token", f"learned={token}", "--json", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_token_name_must_not_repeat_a_word(tmp_path, capsys):
    from safetensors.torch import save_file

    token = tmp_path / "prepared.safetensors"
    save_file({"vectors": torch.zeros(1, 5)}, str(token))
    with pytest.raises(SystemExit) as e:
        io.main(["--concept", "stripes", "--targets", str(_one_image_folder(tmp_path)),
                 "--token", f"art={token}"])
    assert e.value.code == 2
    assert "each NAME once, and none of the --words" in capsys.readouterr().err
