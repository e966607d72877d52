"""Pure-Python CLIP BPE tokenizer reproducing the ids of SD v1's tokenizer.

SD v1 used the transformers 4.19 *slow* ``CLIPTokenizer`` with ftfy installed, whose pipeline is:
``whitespace_clean(ftfy.fix_text(text)).lower()`` -> CLIP regex split -> UTF-8 bytes mapped to printable
unicode (GPT-2 table) -> BPE with a ``</w>`` end-of-word marker -> vocabulary ids. Prompts are framed as
``<|startoftext|> content[:max_length-2] <|endoftext|>`` and padded with ``<|endoftext|>``.

The vocabulary and merges come from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (see ``find_bpe_file``) or
from an HF-style directory holding ``vocab.json`` and ``merges.txt``.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Iterable

import ftfy
import regex
import torch

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_REPO = Path(__file__).resolve().parents[3]
_NUM_MERGES = 49152 - 256 - 2  # merges actually used by CLIP: 48,894

_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 table mapping every byte to a printable unicode character (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    # Order matters: the vocabulary lists the symbols in this order (printable ranges first).
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def whitespace_clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _env_or_repo_candidates() -> Iterable[Path]:
    env = os.environ.get("LDM_CLIP_BPE")
    if env:
        yield Path(env)
    yield _REPO / "assets" / "clip" / BPE_FILENAME


def find_bpe_file() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz``.

    Order: ``$LDM_CLIP_BPE``; ``<repo>/assets/clip/`` (a clone; ``tools/fetch_clip_bpe.py`` puts it there);
    the copy inside an installed ``open_clip`` package (located without importing it). The file is OpenAI's
    data, never part of this package, so an installed copy (``pip install .``) finds it in open_clip or
    ``$LDM_CLIP_BPE``. Raises FileNotFoundError naming the places tried and how to get the file.
    """
    tried = []
    for p in _env_or_repo_candidates():
        tried.append(str(p))
        if p.is_file():
            return p
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / BPE_FILENAME
        tried.append(str(p))
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"CLIP BPE file {BPE_FILENAME} not found (looked at: {', '.join(tried)}). "
        "Run `python tools/fetch_clip_bpe.py` to fetch it into a clone, install open_clip_torch (its package "
        "holds the file: `pip install open_clip_torch==3.3.0`, or the package's `eval` extra), "
        "or point $LDM_CLIP_BPE at a copy."
    )


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer (SD v1 ids, BOS 49406, EOS = pad 49407)."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = encoder
        self.decoder = {v: k for k, v in encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.bos_token_id = encoder[SOT]
        self.eos_token_id = encoder[EOT]
        self.pad_token_id = self.eos_token_id
        self._special = {SOT: self.bos_token_id, EOT: self.eos_token_id}
        self._cache: dict[str, list[int]] = {}

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None) -> "CLIPTokenizer":
        """From the OpenAI ``.txt.gz``/``.txt`` merges file, or an HF directory with vocab.json + merges.txt."""
        path = Path(path) if path is not None else find_bpe_file()
        if path.is_dir():
            return cls._from_hf_dir(path)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        return cls({tok: i for i, tok in enumerate(vocab)}, merges)

    @classmethod
    def _from_hf_dir(cls, path: Path) -> "CLIPTokenizer":
        encoder = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        lines = (path / "merges.txt").read_text(encoding="utf-8").split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(line.split()) for line in lines if line.strip()][:_NUM_MERGES]
        return cls(encoder, merges)

    # ---- tokenization -------------------------------------------------------------------------------
    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenized (byte-encoded) word; cached."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.encoder[p] for p in parts]
        self._cache[word] = ids
        return ids

    def tokenize(self, text: str) -> list[str]:
        """BPE token strings (for debugging)."""
        return [self.decoder[i] for i in self.encode(text)]

    def encode(self, text: str) -> list[int]:
        """Content token ids of ``text`` (no BOS/EOS, no truncation)."""
        text = whitespace_clean(ftfy.fix_text(text)).lower()
        ids: list[int] = []
        for piece in _PAT.findall(text):
            special = self._special.get(piece)
            if special is not None:
                ids.append(special)
                continue
            ids.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in (self.bos_token_id, self.eos_token_id))
        words = (bytes(self.byte_decoder[c] for c in w).decode("utf-8", errors="replace") for w in text.split("</w>"))
        return " ".join(words).strip()

    def __call__(self, texts: str | list[str], max_length: int = 77) -> torch.Tensor:
        """LongTensor [B, max_length]: BOS, content truncated to max_length-2, EOS, EOS padding."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_token_id, *self.encode(text)[: max_length - 2], self.eos_token_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __len__(self) -> int:
        return len(self.encoder)


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> CLIPTokenizer:
    """Process-wide tokenizer built from ``find_bpe_file()``."""
    return CLIPTokenizer.from_file(find_bpe_file())
