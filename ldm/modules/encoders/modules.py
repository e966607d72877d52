"""Conditioning encoders (CompVis ``ldm.modules.encoders.modules`` names)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer, default_tokenizer

# Text tower of openai/clip-vit-large-patch14, the SD v1 conditioning model.
VIT_L14_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    # As in the openai config.json; they only affect the pooled output, which SD v1 does not use.
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


class _CLIPTextHolder(nn.Module):
    """Keeps the SD v1 key layout ``transformer.text_model.*`` (transformers 5 dropped that level)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextModel(config)
        emb = self.text_model.embeddings
        # transformers >= 4.31 made position_ids non-persistent; SD v1 checkpoints store it.
        emb.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=True)

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.text_model(input_ids=input_ids, **kwargs)


class FrozenCLIPEmbedder(AbstractEncoder):
    """CLIP ViT-L/14 text transformer: prompts -> ``last_hidden_state`` [B, 77, 768].

    Nothing is downloaded: the model is built from ``VIT_L14_TEXT_CONFIG`` (updated with ``text_config``), or
    from ``version`` when it is a local directory with a ``config.json``; weights come from the SD checkpoint.
    ``device`` is accepted for CompVis compatibility but ignored: upstream defaulted it to "cuda" and moved the
    tokens there; here tokens follow the module's parameters, so ``.to(device)`` is the only placement control.
    """

    def __init__(self, version: str = "openai/clip-vit-large-patch14", device: str = "cuda", max_length: int = 77,
                 text_config: dict | None = None, tokenizer_path: str | None = None,
                 attn_implementation: str = "sdpa"):
        super().__init__()
        local = Path(version) if os.path.isdir(version) else None
        if local is not None and (local / "config.json").is_file():
            config = CLIPTextConfig.from_pretrained(str(local), local_files_only=True)
            config.update(text_config or {})
        else:
            config = CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **(text_config or {})})
        config._attn_implementation = attn_implementation
        if tokenizer_path is None and local is not None and (local / "vocab.json").is_file() \
                and (local / "merges.txt").is_file():
            tokenizer_path = str(local)
        self.tokenizer_path = tokenizer_path
        self._tokenizer: CLIPTokenizer | None = None
        self.max_length = max_length
        self.transformer = _CLIPTextHolder(config)
        self.register_load_state_dict_pre_hook(FrozenCLIPEmbedder._fix_legacy_keys)
        self.freeze()

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """Loaded on first use, so building the module needs no tokenizer files."""
        if self._tokenizer is None:
            self._tokenizer = (CLIPTokenizer.from_file(self.tokenizer_path) if self.tokenizer_path
                               else default_tokenizer())
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self.transformer.text_model.embeddings.token_embedding.weight.device

    @staticmethod
    def _fix_legacy_keys(module, state_dict, prefix, *args):
        """Accept checkpoints without ``text_model.`` level and with missing/float ``position_ids``."""
        root = prefix + "transformer."
        for key in [k for k in state_dict if k.startswith(root) and not k.startswith(root + "text_model.")]:
            state_dict[root + "text_model." + key[len(root):]] = state_dict.pop(key)
        n = module.transformer.text_model.config.max_position_embeddings
        state_dict[root + "text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.long)[None]

    def freeze(self):
        self.transformer = self.transformer.eval()
        for p in self.parameters():
            p.requires_grad = False

    def forward(self, text: str | list[str]) -> torch.Tensor:
        tokens = self.tokenizer(text, max_length=self.max_length).to(self.device)
        return self.transformer(input_ids=tokens).last_hidden_state

    def encode(self, text: str | list[str]) -> torch.Tensor:
        return self(text)
