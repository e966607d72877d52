"""A damaged SSCD similarity cache of the memorization pipeline (``{folder}/sscd_similarity.txt``) never blocks a
rerun (issue 30, item 8): one ``warning:`` line naming it, the similarities are computed again (equal to a fresh
computation) and the file is replaced by a readable one."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ablation.memorization as mem
from runtime.files import read_text_lines

ROOT = Path(__file__).resolve().parents[2]
COPYDETECT = ROOT / "assets/toyworld/copydetect/copydetect.torchscript.pt"  # a real TorchScript descriptor model


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "check"
    (d / "samples").mkdir(parents=True)
    names = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / "samples" / f"{i:05d}.png")
        names.append(f"samples/{i:05d}.png")
    (d / "images.txt").write_text("\n".join(names) + "\n")
    (d / "caption.txt").write_text("a\nb\nc\n")
    return d


@pytest.mark.parametrize("damage", [b"0.5\nnot a number\n0.1\n", b"\xff\xfe\x00garbage", b"nan\nnan\nnan\n"])
def test_damaged_similarity_cache_is_computed_again(folder, tmp_path, capsys, damage):
    ref_image = folder / "samples" / "00000.png"
    lazy = mem._LazySSCD(COPYDETECT, "cpu")
    _, _, fresh = mem._scored(lazy, folder, ref_image)
    cache = folder / "sscd_similarity.txt"
    assert len(read_text_lines(cache)) == 3
    cache.write_bytes(damage)
    capsys.readouterr()
    _, _, again = mem._scored(mem._LazySSCD(COPYDETECT, "cpu"), folder, ref_image)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and str(cache) in lines[0] and "recomputing" in lines[0], err
    assert torch.allclose(again, fresh, atol=1e-6)
    assert torch.allclose(torch.tensor([float(v) for v in read_text_lines(cache)]), fresh, atol=1e-5)
    # read back silently, without SSCD
    _, _, cached = mem._scored(mem._LazySSCD(tmp_path / "absent.pt", "cpu"), folder, ref_image)
    assert torch.allclose(cached, fresh, atol=1e-5) and "warning" not in capsys.readouterr().err


def test_damaged_memorization_settings_file_is_one_clear_error(folder, tmp_path):
    """``memorization.json`` is the prepared folder's identity, not a cache: when it is damaged nothing in the folder
    can be trusted, so it is refused (one line naming it), before anything is generated."""
    from conftest import CountingFactory

    from runtime.generate import Sampling

    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "memorization.json").write_bytes(b'{"version": 1, "capt')
    factory = CountingFactory()
    with pytest.raises(mem.MemorizationSettingsError, match="memorization.json is unreadable") as info:
        mem.prepare_memorization_data(factory, COPYDETECT, folder / "samples" / "00000.png", ["a house", "a cat"],
                                      gen, "A House", train_size=2, n_check=1, check_steps=2, anchor_size=2,
                                      target_size=1, sampling=Sampling(steps=2, batch_size=2, height=16, width=16))
    assert "\n" not in str(info.value) and str(gen) in str(info.value)
    assert factory.calls == 0 and sorted(p.name for p in gen.iterdir()) == ["memorization.json"]
