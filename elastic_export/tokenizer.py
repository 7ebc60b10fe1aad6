"""Tokenizers: a built-in byte-level one (no download) and any HF ``tokenizer.json`` via `tokenizers`.

Byte-level ids: 0 = pad, 1 = bos, 2 = eos, 3 + b for byte b (vocab 259). A checkpoint names its
tokenizer in ``tokenizer/``: either ``tokenizer.json`` (HF) or ``byte_level.json`` (this one).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError

PAD, BOS, EOS, OFFSET = 0, 1, 2, 3


class ByteTokenizer:
    vocab_size = 256 + OFFSET
    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + OFFSET for b in text.encode("utf-8")]
        return [BOS] + ids if add_bos else ids

    def decode(self, ids) -> str:
        return bytes(int(i) - OFFSET for i in ids if int(i) >= OFFSET and int(i) - OFFSET < 256).decode(
            "utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "byte_level.json").write_text(json.dumps({"type": "byte_level", "offset": OFFSET}) + "\n")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the `tokenizers` library."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ConfigError(f"is not a valid tokenizer.json ({e})", path=self.path) from None
        self.vocab_size = self._tok.get_vocab_size()
        vocab = self._tok.get_vocab()
        self.pad_token_id = next((vocab[t] for t in ("<pad>", "[PAD]", "<|pad|>") if t in vocab), None)
        self.bos_token_id = next((vocab[t] for t in ("<s>", "<|begin_of_text|>", "[BOS]") if t in vocab), None)
        self.eos_token_id = next((vocab[t] for t in ("</s>", "<|end_of_text|>", "<|endoftext|>", "[EOS]")
                                  if t in vocab), None)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id] + ids if add_bos and self.bos_token_id is not None else ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._tok.save(str(Path(directory) / "tokenizer.json"))


def load_tokenizer(path: str | Path | None):
    """A tokenizer from a ``tokenizer.json`` file or a ``tokenizer/`` directory; byte-level when None."""
    if path is None:
        return ByteTokenizer()
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path / "tokenizer.json")
        if (path / "byte_level.json").is_file():
            return ByteTokenizer()
        raise ConfigError("holds neither tokenizer.json nor byte_level.json", path=path)
    if not path.is_file():
        raise ConfigError("tokenizer file not found", path=path, fix="give a tokenizer.json path")
    return HFTokenizer(path)
