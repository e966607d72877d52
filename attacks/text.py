"""Text-encoder helpers for the white-box attacks, over our CompVis ``FrozenCLIPEmbedder``.

Every function takes the *encoder* (``model.cond_stage_model``: ``.tokenizer``, ``.max_length`` and
``.transformer.text_model``, a transformers ``CLIPTextModel``), so it works for any model the benchmark loads.

The attacks optimise continuous token embeddings, so the encoder must run from ``inputs_embeds``:
transformers 5's ``CLIPTextModel.forward`` only takes ``input_ids``, hence :func:`encode_embeddings` composes
its modules in the same order (token + position embeddings, causal mask, encoder layers, final layer norm).
``encode_embeddings(enc, embed_ids(enc, ids))`` equals ``encode_ids(enc, ids)`` exactly (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask


def text_model(encoder):
    """The transformers ``CLIPTextModel`` inside a ``FrozenCLIPEmbedder``."""
    return encoder.transformer.text_model


def token_embedding_matrix(encoder) -> torch.Tensor:
    """The vocabulary's token embeddings [V, D] (a view of the weights: do not modify)."""
    return text_model(encoder).embeddings.token_embedding.weight


def tokenize(encoder, prompts: str | list[str]) -> torch.Tensor:
    """Token ids [B, 77] exactly as the encoder frames them (BOS, content, EOS, EOS padding), on its device."""
    return encoder.tokenizer(prompts, max_length=encoder.max_length).to(encoder.device)


def content_ids(encoder, prompt: str) -> list[int]:
    """The prompt's content token ids (no BOS/EOS, not truncated)."""
    return encoder.tokenizer.encode(prompt)


def decode(encoder, ids) -> str:
    """Text of token ids (BOS/EOS dropped), as the originals decode an adversarial prompt."""
    return encoder.tokenizer.decode([int(i) for i in ids])


def embed_ids(encoder, ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings [B, L, D] of ids [B, L] (no position embeddings: those are added by the encoder)."""
    return text_model(encoder).embeddings.token_embedding(ids)


def encode_ids(encoder, ids: torch.Tensor) -> torch.Tensor:
    """Conditioning [B, 77, D] from token ids (what ``FrozenCLIPEmbedder.forward`` does after tokenizing)."""
    return encoder.transformer(input_ids=ids).last_hidden_state


def encode_embeddings(encoder, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """Conditioning [B, L, D] from token embeddings [B, L, D], differentiable in ``inputs_embeds``.

    The same modules and causal mask as ``CLIPTextModel.forward``; only the token lookup is skipped."""
    tm = text_model(encoder)
    hidden = tm.embeddings(inputs_embeds=inputs_embeds)
    mask = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
    out = tm.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
    return tm.final_layer_norm(out.last_hidden_state)


def project_nearest(embeds: torch.Tensor, matrix: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Ids [...] of the vocabulary rows nearest to each embedding [..., D].

    ``cosine`` (the default) is the rule of P4D's ``nn_project`` (PEZ): both sides L2-normalised, the largest
    dot product over the whole vocabulary (special tokens included). ``l2``: the smallest Euclidean distance.
    UnlearnDiffAtk does not project embeddings: it optimises a distribution over the vocabulary and takes its
    argmax (see attacks/unlearndiff.py)."""
    flat = embeds.detach().reshape(-1, embeds.shape[-1]).to(matrix.dtype)
    if metric == "cosine":
        scores = F.normalize(flat, dim=-1) @ F.normalize(matrix, dim=-1).T
        ids = scores.argmax(dim=-1)
    elif metric == "l2":
        ids = torch.cdist(flat, matrix).argmin(dim=-1)
    else:
        raise ValueError(f"unknown projection metric {metric!r} (cosine or l2)")
    return ids.reshape(embeds.shape[:-1])


@dataclass(frozen=True)
class Template:
    """A prompt with ``k`` learnable token slots: ids [L] (placeholders at ``slots``), the slot positions [k]
    and ``length``, how many tokens after BOS make the prompt (what is decoded; the rest is EOS/padding).

    :meth:`embeddings` puts adversarial embeddings into the slots (differentiable), :meth:`ids_with` puts
    token ids there (the discrete prompt)."""

    ids: torch.Tensor
    slots: torch.Tensor
    length: int

    @property
    def k(self) -> int:
        return int(self.slots.numel())

    def ids_with(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ids [B, L] with ``tokens`` [B, k] (or [k]) in the slots."""
        tokens = tokens.reshape(-1, self.k).to(self.ids.device)
        out = self.ids.expand(tokens.shape[0], -1).clone()
        out[:, self.slots] = tokens
        return out

    def fixed_embeddings(self, encoder) -> torch.Tensor:
        """Token embeddings [1, L, D] of the template (slots hold the placeholder's embedding)."""
        with torch.no_grad():
            return embed_ids(encoder, self.ids[None])

    def embeddings(self, fixed: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """``fixed`` [1, L, D] (from :meth:`fixed_embeddings`, computed once) with ``adv`` [B, k, D] in the
        slots: [B, L, D], differentiable in ``adv``."""
        out = fixed.expand(adv.shape[0], -1, -1).clone().to(adv.dtype)
        out[:, self.slots] = adv
        return out


def prefix_template(encoder, prompt: str, k: int, placeholder: int | None = None) -> Template:
    """UnlearnDiffAtk's ``prefix_k`` layout: BOS, k adversarial tokens, the prompt's content, EOS, EOS padding.

    The original splits the 77 ids as [BOS | content | k | rest] and rebuilds [BOS | adv | content | rest],
    i.e. the k positions after the content (EOS and padding, all EOS ids) are dropped; that is this layout. A
    prompt whose content does not leave room for k tokens and EOS fails in the original; here its content is
    truncated to ``max_length - 2 - k`` tokens (the tokenizer's own truncation rule, moved by k)."""
    tok = encoder.tokenizer
    n = encoder.max_length
    if not 0 < k <= n - 2:
        raise ValueError(f"k={k} adversarial tokens do not fit in {n} positions with BOS and EOS")
    placeholder = tok.eos_token_id if placeholder is None else placeholder
    body = content_ids(encoder, prompt)[: n - 2 - k]
    row = [tok.bos_token_id, *[placeholder] * k, *body, tok.eos_token_id]
    ids = torch.full((n,), tok.pad_token_id, dtype=torch.long)
    ids[: len(row)] = torch.tensor(row, dtype=torch.long)
    return Template(ids.to(encoder.device), torch.arange(1, 1 + k, device=encoder.device), k + len(body))
