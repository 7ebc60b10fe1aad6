"""Checkpoints of a training run: the resumable training state, and the nested checkpoint it produces.

Training state (``OUT/checkpoint/``, written atomically by rank 0): model, router and optimizer
state, the global step, RNG states, and the metrics already logged. Everything random in a step is
a function of (seed, step), so this is all an exact resume needs.

Nested checkpoint: the one weight file plus a manifest of budgets (DESIGN.md "Nested checkpoint").
:func:`save_nested` hands over to ``elastic_export.nested.save_nested`` (issue 3) when it exists;
until then it writes a compatible minimal layout itself:

    model.safetensors   the full weights, one copy for every budget
    config.json         the parent's HF config (so elastic_export.load() opens the full model)
    elastic.json        {"format": "elastic-export-nested", "format_version": 1, "parent": config,
                         "layout": {"head_order"}, "budgets": [{name, fraction, params, hidden,
                         layers: [{type, kept, widths}]}], "files": {name: sha256}, "training": {...}}
    router.safetensors  the router (to resume or derive new budgets)
    tokenizer/          the tokenizer
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from elastic_export.elastic import Subnet, validate_subnet
from elastic_export.errors import CheckpointError
from elastic_export.hf_io import atomic_dir

FORMAT, VERSION = "elastic-export-nested", 1


# ---- training state -----------------------------------------------------------------------------

def save_state(directory: str | Path, state: dict) -> None:
    """Atomically replace ``directory`` with one holding ``state.pt``."""
    with atomic_dir(directory) as tmp:
        torch.save(state, tmp / "state.pt")


def load_state(directory: str | Path) -> dict | None:
    f = Path(directory) / "state.pt"
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated file cannot exist (atomic writes), but say so if it does
        raise CheckpointError(f"could not be read ({e})", path=f, fix="delete it to start over") from None


def rng_states() -> dict:
    import random

    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s: dict) -> None:
    import random

    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---- nested checkpoint --------------------------------------------------------------------------

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def budget_entry(cfg, name: str, subnet: Subnet, params: int, fraction: float | None = None) -> dict:
    layers = []
    for t, w in zip(cfg.layers_block_type, subnet.layers):
        d = w.to_dict()
        kept = d.pop("kept", True)
        layers.append({"type": t, "kept": kept, "widths": d})
    return {"name": name, "fraction": fraction, "params": int(params), "hidden": subnet.hidden, "layers": layers}


def save_nested(path: str | Path, model, budgets: dict[str, Subnet], router=None, tokenizer=None,
                dtype: torch.dtype | None = None, extra: dict | None = None) -> Path:
    """Write a nested checkpoint (issue 3's writer when merged, else the minimal layout above).

    ``extra``: {"fractions": {name: f}, "params": {name: n}, "training": {...}} recorded in the manifest.
    """
    try:
        from elastic_export.nested import save_nested as core_save  # issue 3
    except ImportError:
        core_save = None
    if core_save is not None:  # TODO(lead): reconcile the signature once issue 3 is merged
        return core_save(path, model, budgets, router=router, tokenizer=tokenizer, dtype=dtype, extra=extra)
    return _save_nested_minimal(path, model, budgets, router, tokenizer, dtype, extra or {})


def _save_nested_minimal(path, model, budgets, router, tokenizer, dtype, extra) -> Path:
    cfg = model.config
    for name, sub in budgets.items():
        validate_subnet(cfg, sub, where=f"budgets.{name}")
    state = {}
    for k, t in model.state_dict().items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        t = t.detach().cpu()
        state[k] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    saved_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {"model.safetensors": sha256(tmp / "model.safetensors")}
        if router is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()},
                      str(tmp / "router.safetensors"), metadata={"format": "pt"})
            files["router.safetensors"] = sha256(tmp / "router.safetensors")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        config = cfg.to_dict(saved_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        fractions, params = extra.get("fractions", {}), extra.get("params", {})
        manifest = {
            "format": FORMAT, "format_version": VERSION, "parent": config,
            "layout": {"head_order": cfg.head_order},
            "budgets": [budget_entry(cfg, n, s, params.get(n, 0), fractions.get(n)) for n, s in budgets.items()],
            "files": files,
            "training": extra.get("training", {}),
        }
        (tmp / "elastic.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def load_nested(path: str | Path, dtype=None):
    """(model, {name: Subnet}, manifest) from a nested checkpoint; checks the SHA-256 of each file."""
    try:
        from elastic_export.nested import load_nested as core_load  # issue 3
    except ImportError:
        core_load = None
    if core_load is not None:
        return core_load(path)
    from elastic_export.hf_io import load

    path = Path(path)
    mf = path / "elastic.json"
    if not mf.is_file():
        raise CheckpointError("is not a nested checkpoint: elastic.json is missing", path=path)
    manifest = json.loads(mf.read_text())
    for name, digest in manifest.get("files", {}).items():
        if not (path / name).is_file():
            raise CheckpointError(f"{name} is missing", path=path)
        if sha256(path / name) != digest:
            raise CheckpointError(f"{name} does not match its SHA-256 in elastic.json", path=path,
                                  fix="the file was modified or is corrupt; copy the checkpoint again")
    model = load(path, dtype=dtype)
    budgets = {}
    for b in manifest["budgets"]:
        layers = [{**l["widths"], "kept": l["kept"]} for l in b["layers"]]
        budgets[b["name"]] = Subnet.from_dict({"hidden": b["hidden"], "layers": layers})
    return model, budgets, manifest


def load_router_state(path: str | Path) -> dict | None:
    f = Path(path) / "router.safetensors"
    return load_file(str(f)) if f.is_file() else None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
