"""The nested checkpoint: one copy of the sorted weights serving every budget.

A directory::

    model.safetensors        the parent's importance-sorted weights (rank-major heads), one copy
    elastic.json             the manifest (below)
    importance.safetensors   optional: the scores in sorted order (to plan new budgets)
    router.safetensors       optional: the router (to resume training or derive new budgets)
    tokenizer/               optional: tokenizer.json or byte_level.json

Manifest (``format_version`` 2)::

    {"format": "elastic-export/nested", "format_version": 2,
     "parent_config": {... HF nemotron_h config.json, with "elastic": {"head_order": "rank_major"}},
     "layout": {"head_order": "rank_major"},
     "files": {"model.safetensors": {"sha256": "...", "bytes": N}, ...},
     "budgets": [{"name": "full", "params": N, "hidden": D,
                  "layers": [{"type": "linear_attention", "kept": true, "mamba_heads": 8, ...}, ...]}, ...]}

Version 2 adds MoE layers: ``{"type": "moe", "kept": true, "experts": E, "expert_ffn": F,
"shared_ffn": S}`` (elastic.LayerWidths), and a parent_config with the MoE fields; the weights hold
the experts stacked (``mixer.experts.up_proj`` [E, F, din]) and the routers in float32. Dense models are still
written (and read) as version 1.

Version 3 is a quantized nested checkpoint (codes + scales, a ``quantization`` entry; see
:mod:`elastic_export.qcheckpoint`); :func:`load_nested` refuses it (it holds no float weights).

Budgets are listed largest first; "full" (the parent) is always present. There is deliberately no
config.json: transformers would load the rank-major weights as group-contiguous and compute garbage.
Slice a budget (:func:`elastic_export.slice_budget`) to get a checkpoint other tools can read.
Loading verifies every file's size and SHA-256 before reading a byte of it; writes are atomic and
stream (one tensor made and written at a time); loaded weights are views of the memory-mapped file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .accounting import count_params
from .config import ModelConfig
from .elastic import LayerWidths, Subnet, full_subnet, validate_subnet
from .errors import BudgetError, CheckpointError, ConfigError
from .hf_io import (CheckpointReader, Lazy, as_lazy, atomic_dir, cast_lazy, dtype_name, expected_shapes,
                    model_entries, model_from, parse_dtype, resolve_tying)
from .safetensors_io import save_tensors, write_file

FORMAT = "elastic-export/nested"
FORMAT_VERSION = 3  # 2: MoE layers (experts / expert_ffn / shared_ffn widths); 3: quantized weights (qcheckpoint)


def format_version(cfg: ModelConfig) -> int:
    """The oldest version that holds this model: 1 for dense ones (older readers keep reading them), 2 with MoE."""
    return 2 if cfg.has_moe else 1  # 3 is written by qcheckpoint.quantize_nested only
MANIFEST = "elastic.json"
WEIGHTS = "model.safetensors"
ROUTER = "router.safetensors"
IMPORTANCE = "importance.safetensors"
TOKENIZER = "tokenizer"


@dataclass
class NestedCheckpoint:
    model: Any  # NemotronHForCausalLM with the full sorted weights (None when loaded without weights)
    budgets: dict[str, Subnet]  # name -> subnet, largest first, "full" included
    manifest: dict
    path: Path
    config: ModelConfig = None
    router: dict[str, torch.Tensor] | None = None
    importance: Any = None  # importance.Importance in sorted order, or None
    extras: dict = field(default_factory=dict)
    source: Any = None  # the hf_io.CheckpointReader the weights are views of

    def drop_pages(self) -> None:
        """Give the weights' pages read so far back to the page cache; they are read again on use.
        Only for a read-only load (``load_nested(..., writable=False)``), whose weights are never written."""
        if self.source is None:
            return
        if any(f.writable for f in self.source.files.values()):
            raise ValueError("drop_pages needs a read-only load: load_nested(..., writable=False)")
        self.source.drop_pages()

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / TOKENIZER
        return p if p.is_dir() else None

    def subnet(self, name: str) -> Subnet:
        if name not in self.budgets:
            raise BudgetError(f"unknown budget {name!r}", path=self.path / MANIFEST,
                              fix=f"use one of {', '.join(self.budgets)}")
        return self.budgets[name]

    def slice(self, name: str, layout: str = "compact"):
        """The standalone model of one budget (``layout``: see :func:`elastic_export.slice_budget`)."""
        from .slicing import slice_budget

        return slice_budget(self.model, self.subnet(name), layout=layout)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _budget_entry(cfg: ModelConfig, name: str, s: Subnet) -> dict:
    return {"name": name, "params": count_params(cfg, s), "hidden": s.hidden,
            "layers": [{"type": t, **w.to_dict()} for t, w in zip(cfg.layers_block_type, s.layers)]}


def check_budgets(cfg: ModelConfig, budgets: dict[str, Subnet]) -> dict[str, Subnet]:
    from .search import NAME_RE

    out = {}
    full = full_subnet(cfg)
    for name, s in budgets.items():
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise BudgetError(f"budget name {name!r} is not usable as a file name", field="budgets",
                              fix="use letters, digits, '.', '_' or '-'")
        if not isinstance(s, Subnet):
            raise BudgetError(f"budget {name!r} is a {type(s).__name__}, not a Subnet", field="budgets")
        validate_subnet(cfg, s, where=f"budget {name}")
        if name == "full" and s != full:
            raise BudgetError("budget 'full' must be the parent itself", field="budgets",
                              fix="name the smaller budget otherwise")
        out[name] = s
    out.setdefault("full", full)
    return dict(sorted(out.items(), key=lambda kv: -count_params(cfg, kv[1])))


def save_nested(path: str | Path, model, budgets: dict[str, Subnet], router=None, importance=None,
                tokenizer=None, dtype: str | torch.dtype | None = None, extra: dict | None = None,
                after=None) -> Path:
    """Write a nested checkpoint atomically. Every budget is validated before anything is written.

    ``router``: a module or a dict of tensors; ``importance``: scores in sorted order;
    ``tokenizer``: a directory or tokenizer.json path, or an object with ``save(directory)``;
    ``extra``: JSON-able provenance for the manifest: ``{"fractions": {name: f}}`` adds a
    ``fraction`` to those budgets, ``"training"`` becomes the manifest's ``training`` entry, any
    other key goes under ``extra`` (``"params"`` is ignored: counts are always computed); ``after(name)``
    runs once each weight is written (e.g. to drop the pages of a memory-mapped source).
    """
    return save_nested_state(path, model.config, model_entries(model), budgets, router, importance, tokenizer,
                             dtype, extra, after)


def save_nested_state(path: str | Path, cfg: ModelConfig, state: dict, budgets: dict[str, Subnet], router=None,
                      importance=None, tokenizer=None, dtype: str | torch.dtype | None = None,
                      extra: dict | None = None, after=None) -> Path:
    """:func:`save_nested` of a config and its state: name -> tensor, or hf_io.Lazy (made and written
    one at a time, never all in memory); names as the model's state_dict (lm_head.weight unless tied)."""
    extra = dict(extra or {})
    fractions = extra.pop("fractions", None) or {}
    training = extra.pop("training", None)
    extra.pop("params", None)
    try:
        json.dumps([fractions, training, extra])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"is not JSON-serializable ({e})", field="extra") from None
    path = Path(path)
    budgets = check_budgets(cfg, dict(budgets))
    dtype = parse_dtype(dtype)
    state = {n: cast_lazy(n, e if isinstance(e, Lazy) else as_lazy(e), dtype) for n, e in state.items()}
    router_state = None
    if router is not None:
        router_state = router.state_dict() if hasattr(router, "state_dict") else dict(router)
        router_state = {k: v.detach().contiguous().cpu() for k, v in router_state.items()}
    tok_src = None
    if tokenizer is not None and not hasattr(tokenizer, "save"):
        tok_src = Path(tokenizer)
        if not tok_src.exists():
            raise ConfigError("tokenizer not found", path=tok_src, fix="give a tokenizer/ directory or tokenizer.json")
    with atomic_dir(path) as tmp:
        write_file(tmp / WEIGHTS, {n: (e.dtype, e.shape) for n, e in state.items()}, lambda n: state[n].make(),
                   {"format": "pt"}, after)
        names = [WEIGHTS]
        if router_state is not None:
            save_tensors(tmp / ROUTER, router_state, {"format": "pt"})
            names.append(ROUTER)
        if importance is not None:
            save_tensors(tmp / IMPORTANCE, importance.to_tensors(), {"format": "pt"})
            names.append(IMPORTANCE)
        if tokenizer is not None:
            if tok_src is None:
                tokenizer.save(tmp / TOKENIZER)
            elif tok_src.is_dir():
                shutil.copytree(tok_src, tmp / TOKENIZER)
            else:
                (tmp / TOKENIZER).mkdir()
                shutil.copy2(tok_src, tmp / TOKENIZER / "tokenizer.json")
        manifest = {
            "format": FORMAT, "format_version": format_version(cfg),
            "parent_config": cfg.to_dict(dtype_name(state["backbone.embeddings.weight"].dtype)),
            "layout": {"head_order": cfg.head_order},
            "files": {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in names},
            "budgets": [{**_budget_entry(cfg, n, s), **({"fraction": fractions[n]} if n in fractions else {})}
                        for n, s in budgets.items()],
        }
        if training is not None:
            manifest["training"] = training
        if extra:
            manifest["extra"] = extra
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


# ---- reading ------------------------------------------------------------------------------------

def is_nested(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> tuple[dict, ModelConfig, dict[str, Subnet]]:
    """The manifest, the parent config and the budgets (largest first), without touching the weights."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError("does not exist or is not a directory", path=path,
                              fix="give a nested checkpoint directory (with elastic.json)")
    if not mf.is_file():
        raise CheckpointError("is not a nested checkpoint: elastic.json is missing", path=path,
                              fix="give a directory written by `elastic-export rank` or `nest`")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"is not valid JSON ({e})", path=mf) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"is not an {FORMAT} manifest", path=mf, field="format")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"has format_version {version!r}; this version reads up to {FORMAT_VERSION}", path=mf,
                              field="format_version", fix="upgrade elastic-export")
    for key in ("parent_config", "files", "budgets"):
        if key not in manifest:
            raise CheckpointError("is missing", path=mf, field=key)
    cfg = ModelConfig.from_dict(manifest["parent_config"], path=mf)
    budgets: dict[str, Subnet] = {}
    for k, b in enumerate(manifest["budgets"]):
        try:
            name = b["name"]
            layers = [dict(w) for w in b["layers"]]
            types = [w.pop("type") for w in layers]
            s = Subnet(int(b["hidden"]), tuple(LayerWidths(**w) for w in layers))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"budget entry {k} is malformed ({e})", path=mf, field="budgets") from None
        if types != cfg.layers_block_type:
            raise CheckpointError(f"budget {name!r}: layer types do not match the parent config", path=mf,
                                  field="budgets")
        validate_subnet(cfg, s, where=f"budget {name}")
        budgets[name] = s
    if "full" not in budgets:
        budgets["full"] = full_subnet(cfg)
    budgets = dict(sorted(budgets.items(), key=lambda kv: -count_params(cfg, kv[1])))
    return manifest, cfg, budgets


def verify_files(path: Path, manifest: dict, names=None) -> None:
    """Size and SHA-256 of each listed file against the manifest; CheckpointError on any mismatch."""
    files = manifest["files"]
    if WEIGHTS not in files:
        raise CheckpointError(f"lists no {WEIGHTS}", path=path / MANIFEST, field="files")
    for name, rec in files.items():
        if names is not None and name not in names:
            continue
        f = path / name
        if not f.is_file():
            raise CheckpointError("is missing (listed in elastic.json)", path=f, fix="copy the whole checkpoint again")
        size = f.stat().st_size
        if size != rec.get("bytes"):
            kind = "truncated" if size < rec.get("bytes", 0) else "the wrong size"
            raise CheckpointError(f"is {kind}: {size} bytes, elastic.json records {rec.get('bytes')}", path=f,
                                  fix="copy the file again; it was not fully written or copied")
        if sha256_file(f) != rec.get("sha256"):
            raise CheckpointError("does not match the SHA-256 recorded in elastic.json", path=f,
                                  fix="the weights were modified or corrupted after saving; copy them again "
                                      "or re-create the checkpoint")


def _read(f: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a small file (router, scores): views of a copy-on-write map."""
    reader = CheckpointReader.of_file(f, writable=True)
    return {k: reader.tensor(k) for k in reader.specs()}


def read_importance(path: str | Path, cfg: ModelConfig | None = None, verify: bool = True):
    """The scores stored with a nested checkpoint (sorted order), or None when it has none."""
    from .importance import Importance

    path = Path(path)
    manifest, mcfg, _ = read_manifest(path)
    if IMPORTANCE not in manifest["files"]:
        return None
    if verify:
        verify_files(path, manifest, [IMPORTANCE])
    return Importance.from_tensors(_read(path / IMPORTANCE), (cfg or mcfg).num_hidden_layers)


def open_nested(path: str | Path, verify: bool = True, writable: bool = False) -> tuple:
    """(manifest, parent config with tying resolved, budgets, hf_io.CheckpointReader of the weights):
    files verified (``verify``), every tensor checked against the parent config from the header alone."""
    path = Path(path)
    manifest, cfg, budgets = read_manifest(path)
    if "quantization" in manifest:  # codes + scales (qcheckpoint.py): never read them as float weights
        raise CheckpointError(f"holds {manifest['quantization'].get('format')} quantized weights, not float ones",
                              path=path / MANIFEST, field="quantization",
                              fix="give the float checkpoint it was quantized from; load, slice and run read this one")
    if verify:
        verify_files(path, manifest)
    reader = CheckpointReader.of_file(path / WEIGHTS, writable)
    specs = reader.specs()
    cfg = resolve_tying(cfg, specs)
    for name, shape in expected_shapes(cfg).items():
        if name not in specs:
            raise CheckpointError(f"tensor {name!r} is missing", path=path / WEIGHTS,
                                  fix="the weights do not match the manifest's parent_config")
        if tuple(specs[name][1]) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(specs[name][1])}, the parent config "
                                  f"implies {tuple(shape)}", path=path / WEIGHTS)
    return manifest, cfg, budgets, reader


def load_nested(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                verify: bool = True, writable: bool = True) -> NestedCheckpoint:
    """Read a nested checkpoint: the sorted parent model, its budgets and the optional parts.

    Every file's size and SHA-256 is checked against the manifest first (``verify=False`` skips the
    hash, for trusted local copies of very large files). The weights are views of the memory-mapped
    file where ``dtype`` and ``device`` leave them as stored (copy-on-write; ``writable=False``: read-only,
    for callers that never write them, which may then :meth:`NestedCheckpoint.drop_pages`), else
    copied one tensor at a time.
    """
    from .importance import Importance

    path = Path(path)
    manifest, cfg, budgets, reader = open_nested(path, verify, writable)
    model = model_from(cfg, reader, dtype, device).eval()
    router = _read(path / ROUTER) if ROUTER in manifest["files"] else None
    importance = Importance.from_tensors(_read(path / IMPORTANCE), cfg.num_hidden_layers) \
        if IMPORTANCE in manifest["files"] else None
    return NestedCheckpoint(model=model, budgets=budgets, manifest=manifest, path=path, config=cfg, router=router,
                            importance=importance, source=reader)
