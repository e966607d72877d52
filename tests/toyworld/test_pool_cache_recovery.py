"""A damaged toy-world pool cache (``toyworld.ldm.cached_pool``) never blocks a rerun (issue 30, item 8): a
truncated or hostile file is one ``warning:`` line naming it, the pool is rendered again (equal to a fresh
rendering) and the file is replaced atomically by a readable one."""
import pickle
import warnings

import torch
from conftest import Evil

from toyworld import ldm as tl


def _check_recovers(tmp_path, capsys, damage):
    ref = tl.render_pool(12, seed=5, size=32, progress=False)
    tl.cached_pool(12, seed=5, size=32, cache_dir=tmp_path, progress=False)
    (cache,) = tmp_path.glob("pool-5-12-32-*.pt")
    damage(cache)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, captions, labels = tl.cached_pool(12, seed=5, size=32, cache_dir=tmp_path, progress=False)
    err = capsys.readouterr().err + "".join(str(w.message) for w in caught)
    lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and str(cache) in lines[0] and "recomputing" in lines[0], err
    assert "weights_only" not in err
    assert torch.equal(images, ref[0]) and captions == ref[1] and labels == ref[2]
    obj = torch.load(cache, weights_only=True)  # replaced, readable, the same pool
    assert torch.equal(obj["images"], ref[0]) and obj["captions"] == ref[1]
    assert not list(tmp_path.glob(".*tmp"))
    tl.cached_pool(12, seed=5, size=32, cache_dir=tmp_path, progress=False)
    assert "warning" not in capsys.readouterr().err  # read back silently


def test_truncated_pool_cache_is_rendered_again(tmp_path, capsys):
    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 3])

    _check_recovers(tmp_path, capsys, truncate)


def test_hostile_or_foreign_pool_cache_is_rendered_again_without_running_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _check_recovers(tmp_path / "a", capsys, lambda p: p.write_bytes(pickle.dumps(Evil(marker))))
    assert not marker.exists()
    # a readable file that is not this pool (another size): not used
    _check_recovers(tmp_path / "b", capsys, lambda p: torch.save(
        {"images": torch.zeros(3, 3, 8, 8, dtype=torch.uint8), "captions": [""] * 3, "labels": [0] * 3}, p))
