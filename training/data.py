"""Training data: token streams from local sources, mixed and packed into fixed-length windows.

Sources (recipe ``[[data.sources]]``):
- ``stdlib``: the CPython standard library's source (``sysconfig.get_paths()["stdlib"]``, *.py,
  test suites and site-packages left out): real text that ships with Python itself.
- ``text``: a file, or a directory's files matching ``glob``.
- ``jsonl``: one JSON object per line, text under ``field``.
- ``tokens``: pre-tokenized ids, ``.npy`` or raw ``.bin`` of ``dtype``.
- ``tasks``: synthetic reasoning tasks (elastic_export.tasks), ``variant`` short / long / mixed.

Each document becomes [bos] + ids + [eos]; documents are concatenated into one stream per source.
A held-out share of documents (the last ones in a fixed shuffled order) feeds evaluation.
Window k of the mixture (``seq_len + 1`` tokens: inputs and shifted targets) is a pure function
of (seed, k): the source by weight, then a uniform offset. So step s of any run on any number of
processes reads the same windows, and resuming needs only the step.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import torch

from elastic_export.errors import ConfigError

from elastic_export.tasks import make_tasks


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))


def _documents(src: dict, seed: int) -> list[str] | np.ndarray:
    kind = src["kind"]
    if kind == "stdlib":
        return [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
    if kind == "text":
        path = Path(src["path"])
        files = sorted(f for f in path.glob(src.get("glob", "**/*")) if f.is_file()) if path.is_dir() else [path]
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if kind == "jsonl":
        docs = []
        fld = src.get("field", "text")
        for n, line in enumerate(Path(src["path"]).read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)[fld])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"line {n + 1} is not a JSON object with a {fld!r} string", path=src["path"],
                                  field="data.sources.field") from None
        return docs
    if kind == "tasks":
        return [t.text for t in make_tasks(src.get("count", 20000), src.get("variant", "mixed"), seed)]
    if kind == "tokens":
        path = Path(src["path"])
        if path.suffix == ".npy":
            return np.load(path).reshape(-1).astype(np.int64)
        return np.fromfile(path, dtype=np.dtype(src.get("dtype", "uint16"))).astype(np.int64)
    raise ValueError(kind)


def encode_documents(docs: list[str], tokenizer) -> list[np.ndarray]:
    from elastic_export.tokenizer import ByteTokenizer, OFFSET

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for doc in docs:
        if isinstance(tokenizer, ByteTokenizer):  # fast path: bytes -> ids without a Python loop
            ids = np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.int64) + OFFSET
        else:
            ids = np.asarray(tokenizer.encode(doc), dtype=np.int64)
        out.append(np.concatenate([np.asarray(bos, np.int64), ids, np.asarray(eos, np.int64)]))
    return out


class Source:
    """One source's train and held-out token streams."""

    def __init__(self, spec: dict, tokenizer, seed: int, held_out: float):
        self.name = spec.get("name") or spec["kind"]
        self.weight = float(spec.get("weight", 1.0))
        docs = _documents(spec, seed)
        if isinstance(docs, np.ndarray):  # pre-tokenized: split the stream itself
            cut = int(len(docs) * (1 - held_out))
            self.train, self.held = torch.from_numpy(docs[:cut]), torch.from_numpy(docs[cut:])
        else:
            order = list(range(len(docs)))
            random.Random(f"split-{seed}").shuffle(order)
            n_held = int(round(len(docs) * held_out)) if len(docs) > 1 else 0
            enc = encode_documents([docs[i] for i in order], tokenizer)
            self.train = torch.from_numpy(np.concatenate(enc[:len(enc) - n_held] or [np.zeros(0, np.int64)]))
            self.held = torch.from_numpy(np.concatenate(enc[len(enc) - n_held:] or [np.zeros(0, np.int64)]))
        vocab = tokenizer.vocab_size
        if len(self.train) and int(self.train.max()) >= vocab:
            raise ConfigError(f"holds token id {int(self.train.max())} >= the vocabulary size {vocab}",
                              path=spec.get("path"), field="data.sources", fix="use the matching tokenizer")


class Mixture:
    """Weighted mixture of sources, served as windows of ``seq_len + 1`` tokens."""

    def __init__(self, sources: list[Source], seed: int = 0):
        self.sources = sources
        self.seed = seed
        self.weights = [s.weight for s in sources]

    def window(self, k: int, seq_len: int, split: str = "train") -> torch.Tensor:
        rng = random.Random(self.seed * 7_919 + k * 104_729 + seq_len)
        usable = [i for i, s in enumerate(self.sources) if len(getattr(s, split)) > seq_len + 1]
        if not usable:
            raise ConfigError(f"no {split} source is longer than seq_len + 1 = {seq_len + 1} tokens",
                              field="data.sources", fix="add data or shorten stages.seq_len")
        i = rng.choices(usable, weights=[self.weights[j] for j in usable])[0]
        stream = getattr(self.sources[i], split)
        start = rng.randrange(len(stream) - seq_len - 1)
        return stream[start:start + seq_len + 1]

    def batch(self, indices, seq_len: int, split: str = "train") -> torch.Tensor:
        """[len(indices), seq_len + 1] token ids."""
        return torch.stack([self.window(k, seq_len, split) for k in indices]).long()


def build_mixture(data_cfg: dict, tokenizer, seed: int) -> Mixture:
    return Mixture([Source(s, tokenizer, seed, data_cfg["held_out"]) for s in data_cfg["sources"]], seed)
