"""SD v1 tokenizer ids and FrozenCLIPEmbedder against the golden fixtures (offline, CPU)."""
import json

import pytest
import torch
from conftest import REF, ref_case, tol, weights

from ldm.modules.encoders.clip_tokenizer import default_tokenizer
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.util import instantiate_from_config

TOKENIZER_CASES = json.loads((REF / "tokenizer_cases.json").read_text())["cases"]


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=[c["name"] for c in TOKENIZER_CASES])
def test_tokenizer_ids(case):
    ids = default_tokenizer()(case["prompt"])
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0].tolist() == case["input_ids"]


def _tiny_embedder(**extra):
    meta, t = ref_case("text_encoder_tiny")
    config = {"target": meta["config"]["target"],
              "params": {**meta["config"]["params"],
                         "text_config": meta["config"]["text_config_used_instead_of_download"], **extra}}
    model = instantiate_from_config(config)
    sd = weights(t)
    W = torch.zeros(49408, 32)
    W[t["token_embedding_rows.ids"]] = t["token_embedding_rows.values"]
    sd["transformer.text_model.embeddings.token_embedding.weight"] = W
    return model, sd, meta, t


def test_tiny_text_encoder_matches_reference():
    model, sd, meta, t = _tiny_embedder()
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.tokenizer(meta["prompts"]), t["input_ids"])
    with torch.no_grad():
        direct = model.transformer(input_ids=t["input_ids"]).last_hidden_state
        encoded = model.encode(meta["prompts"])
    torch.testing.assert_close(direct, t["last_hidden_state"], **tol(meta))
    torch.testing.assert_close(encoded, t["last_hidden_state"], **tol(meta))


def test_state_dict_layout_matches_sd_v1():
    keys = json.loads((REF / "sd-v1-keys.json").read_text())["keys"]
    prefix = "cond_stage_model."
    expected = {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = FrozenCLIPEmbedder()
    sd = model.state_dict()
    assert list(sd) == list(expected)
    assert {k: list(v.shape) for k, v in sd.items()} == expected
    assert sd["transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert not any(p.requires_grad for p in model.parameters())


def test_load_legacy_and_modern_key_layouts():
    model, sd, meta, t = _tiny_embedder()
    pos = "transformer.text_model.embeddings.position_ids"
    # transformers >= 4.31 checkpoints: no position_ids; a corrupted/float one is normalised too.
    no_pos = {k: v for k, v in sd.items() if k != pos}
    model.load_state_dict(no_pos, strict=True)
    model.load_state_dict({**sd, pos: torch.full((1, 77), 3.0)}, strict=True)
    ids = model.transformer.text_model.embeddings.position_ids
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])
    # transformers 5 CLIPTextModel keys (no `text_model.` level), nested under a parent prefix.
    flat = {k.replace("transformer.text_model.", "transformer.", 1): v for k, v in no_pos.items()}
    parent = torch.nn.Module()
    parent.cond_stage_model, _, _, _ = _tiny_embedder()
    parent.load_state_dict({"cond_stage_model." + k: v for k, v in flat.items()}, strict=True)
    with torch.no_grad():
        out = parent.cond_stage_model.transformer(input_ids=t["input_ids"]).last_hidden_state
    torch.testing.assert_close(out, t["last_hidden_state"], **tol(meta))


def test_local_version_directory(tmp_path):
    """`version` may be a local HF CLIP directory: its text config and vocab.json/merges.txt are used."""
    from transformers import CLIPConfig

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    CLIPConfig(text_config=small, vision_config=dict(small, num_hidden_layers=1)).save_pretrained(tmp_path)
    tok = default_tokenizer()
    (tmp_path / "vocab.json").write_text(json.dumps(tok.encoder))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    model = FrozenCLIPEmbedder(version=str(tmp_path), text_config={"num_hidden_layers": 1})
    config = model.transformer.text_model.config
    assert (config.hidden_size, config.num_hidden_layers) == (32, 1)
    assert model.tokenizer is not tok
    prompts = [c["prompt"] for c in TOKENIZER_CASES]
    assert torch.equal(model.tokenizer(prompts), tok(prompts))
    assert model.encode(prompts[:2]).shape == (2, 77, 32)


def test_find_bpe_file(monkeypatch, tmp_path):
    from ldm.modules.encoders import clip_tokenizer as ct

    real = ct.find_bpe_file()
    copy = tmp_path / ct.BPE_FILENAME
    copy.write_bytes(real.read_bytes())
    monkeypatch.setenv("LDM_CLIP_BPE", str(copy))
    assert ct.find_bpe_file() == copy
    monkeypatch.setenv("LDM_CLIP_BPE", str(tmp_path / "missing.gz"))
    monkeypatch.setattr(ct, "_REPO", tmp_path)
    monkeypatch.setattr(ct.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="tools/fetch_clip_bpe.py"):
        ct.find_bpe_file()
