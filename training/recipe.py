"""Training recipes (TOML): parsed strictly and validated before any training starts.

A recipe names the parent (``model.init = "scratch"`` with ``[model.config]``, or a checkpoint
directory), the data, the budgets, the router, distillation and a list of stages. A ``pretrain``
stage trains the parent alone with cross-entropy; ``elastic`` stages train every budget at once
(router + distillation). The paper's curriculum is two elastic stages: short sequences with uniform
budget sampling, then longer ones with weighted sampling (see recipes/default.toml).

``train.parallel``: ``ddp`` (the default: every process holds the whole model, DDP averages gradients;
plain single-process training on one process) or ``fsdp2`` (torch's fully_shard: parameters, gradients,
AdamW moments and the frozen teacher sharded over the processes, on 1 process too); see docs/training.md.
``train.activation_checkpointing``: recompute each decoder layer's activations in the backward.

Every problem is a ConfigError naming the recipe file and the field (``stages[1].seq_len``): an
unknown or misspelt field, a missing one, a wrong type, a data path that does not exist, budgets
the parent cannot reach with the router's choices.

``router.budget_metric``: what a budget's fraction is a fraction of: ``params`` (total parameters, the
paper's C), ``active`` (parameters one token computes with: a MoE layer's routed experts counted
top-k times; the same as ``params`` for a model without MoE layers) or ``memory`` (weights + KV cache
+ Mamba state at ``router.memory_context`` tokens). The MoE axes (``experts``, ``expert_ffn``,
``shared_ffn``) are in the default ``router.axes``; a parent without MoE layers has none of them.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from elastic_export.errors import ConfigError

REQ = object()  # marks a required field
NUM = (int, float)

# field -> (type(s), default or REQ, allowed values or None)
SCHEMA: dict[str, dict[str, tuple]] = {
    "": {"name": (str, REQ, None), "seed": (int, 0, None), "out": (str, None, None),
         "model": (dict, REQ, None), "data": (dict, REQ, None), "budgets": (dict, REQ, None),
         "router": (dict, {}, None), "distill": (dict, {}, None), "stages": (list, REQ, None),
         "train": (dict, {}, None), "output": (dict, {}, None)},
    "model": {"init": (str, REQ, None), "config": (dict, None, None), "tokenizer": (str, "byte", None)},
    "data": {"sources": (list, REQ, None), "held_out": (NUM, 0.02, None), "eval_windows": (int, 16, None),
             "eval_tasks": (int, 64, None)},
    "source": {"kind": (str, REQ, ("stdlib", "text", "jsonl", "tokens", "tasks")), "name": (str, None, None),
               "weight": (NUM, 1.0, None), "path": (str, None, None), "glob": (str, "**/*", None),
               "field": (str, "text", None), "dtype": (str, "uint16", ("uint16", "int32", "int64")),
               "variant": (str, "mixed", ("short", "long", "mixed")), "count": (int, 20000, None)},
    "budgets": {"names": (list, REQ, None), "fractions": (list, REQ, None)},
    "router": {"hidden": (int, 256, None), "lr": (NUM, 1e-2, None), "warmup_steps": (int, 60, None),
               "width_choices": (list, [0.5, 0.625, 0.75, 0.875, 1.0], None),
               "axes": (list, ["embedding", "mamba_heads", "mamba_head_dim", "attn_heads", "ffn", "experts",
                               "expert_ffn", "shared_ffn", "depth"], None),
               "heterogeneous": (bool, True, None), "max_dropped_layers": (int, 1, None),
               "depth_ranking": (list, None, None), "embedding_multiple": (int, 16, None),
               "calibration_windows": (int, 32, None), "depth_mode": (str, "oneshot", ("oneshot", "iterative")),
               "head_channels": (int, None, None),
               "budget_metric": (str, "params", ("params", "active", "memory")), "memory_context": (int, 4096, None),
               "lambda": (NUM, 1.0, None), "tolerance": (NUM, 0.05, None),
               "budget_cost": (str, "expected", ("expected", "sampled")), "repair": (bool, True, None),
               "freeze_after": (str, None, None), "nested": (bool, False, None),
               "tau_start": (NUM, 1.0, None), "tau_end": (NUM, 0.05, None),
               "scale_start": (NUM, 1.0, None), "scale_end": (NUM, 10.0, None)},
    "distill": {"mode": (str, "frozen", ("frozen", "trainable")), "temperature": (NUM, 1.0, None),
                "alpha": (NUM, 1.0, None)},
    "stage": {"name": (str, REQ, None), "kind": (str, REQ, ("pretrain", "elastic")), "tokens": (int, REQ, None),
              "seq_len": (int, REQ, None), "batch_size": (int, REQ, None), "lr": (NUM, REQ, None),
              "warmup_steps": (int, 60, None), "min_lr_ratio": (NUM, 0.1, None),
              "weight_decay": (NUM, 0.0, None), "sampling": (str, "uniform", ("uniform", "weighted", "sandwich")),
              "weights": (list, None, None)},
    "train": {"grad_accum": (int, 1, None), "checkpoint_every": (int, 100, None), "log_every": (int, 10, None),
              "precision": (str, "auto", ("auto", "float32", "bf16")), "grad_clip": (NUM, 1.0, None),
              "threads": (int, 0, None), "progress": (bool, True, None), "eval_batch_size": (int, 64, None),
              "parallel": (str, "ddp", ("ddp", "fsdp2")), "activation_checkpointing": (bool, False, None)},
    "output": {"path": (str, None, None), "dtype": (str, "parent", ("parent", "float32", "bfloat16"))},
}


def _check_table(raw: dict, section: str, where: str, path) -> dict:
    schema = SCHEMA[section]
    for key in raw:
        if key not in schema:
            close = difflib.get_close_matches(key, schema, n=1)
            raise ConfigError("unknown field", path=path, field=f"{where}{key}",
                              fix=f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(schema)}")
    out = {}
    for key, (typ, default, allowed) in schema.items():
        fld = f"{where}{key}"
        if key not in raw:
            if default is REQ:
                raise ConfigError("is missing", path=path, field=fld, fix="add it to the recipe")
            out[key] = default
            continue
        v = raw[key]
        if v is None and default is None:  # an optional field given as "not set" (a validated recipe re-checked)
            out[key] = None
            continue
        types = typ if isinstance(typ, tuple) else (typ,)
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            names = "/".join(t.__name__ if t is not dict else "table" for t in types)
            raise ConfigError(f"must be {names}, got {type(v).__name__} {v!r}", path=path, field=fld)
        if allowed is not None and v not in allowed:
            raise ConfigError(f"is {v!r}", path=path, field=fld, fix=f"use one of {', '.join(map(str, allowed))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise ConfigError(f"must not be negative, got {v!r}", path=path, field=fld)
        out[key] = v
    return out


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> dict:
    """Read and validate a recipe; returns a plain dict with every default filled in."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("recipe not found", path=path, fix="give the path of a .toml recipe")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"is not valid TOML ({e})", path=path) from None
    return validate_recipe(raw, path, base=path.parent, overrides=overrides)


def validate_recipe(raw: dict, path=None, base: Path | None = None, overrides: dict | None = None) -> dict:
    base = Path(base or ".")
    r = _check_table(raw, "", "", path)
    for key in ("model", "data", "budgets", "router", "distill", "train", "output"):
        r[key] = _check_table(r[key], key, f"{key}.", path)
    r.update(overrides or {})
    r["out"] = r["out"] or f"runs/{r['name']}"

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else (base / q)

    # data
    if not r["data"]["sources"]:
        raise ConfigError("is empty", path=path, field="data.sources", fix="add at least one [[data.sources]]")
    sources = []
    for i, s in enumerate(r["data"]["sources"]):
        where = f"data.sources[{i}]."
        if not isinstance(s, dict):
            raise ConfigError("must be a table", path=path, field=where[:-1])
        s = _check_table(s, "source", where, path)
        if s["kind"] in ("text", "jsonl", "tokens"):
            if s["path"] is None:
                raise ConfigError(f"is missing (a {s['kind']} source needs a path)", path=path, field=where + "path")
            p = resolve(s["path"])
            if not p.exists():
                raise ConfigError(f"{str(p)!r} does not exist", path=path, field=where + "path",
                                  fix="give an existing file or directory (relative paths are from the recipe)")
            s["path"] = str(p)
        sources.append(s)
    r["data"]["sources"] = sources
    if not 0 <= r["data"]["held_out"] < 1:
        raise ConfigError("must be in [0, 1)", path=path, field="data.held_out")

    # model
    m = r["model"]
    if m["init"] == "scratch":
        if m["config"] is None:
            raise ConfigError("is missing (model.init = 'scratch' needs the parent's config)", path=path,
                              field="model.config")
    else:
        p = resolve(m["init"])
        if not ((p / "config.json").is_file() or (p / "elastic.json").is_file()):
            raise ConfigError(f"{str(p)!r} is neither a checkpoint (config.json) nor a nested checkpoint "
                              "(elastic.json)", path=path, field="model.init",
                              fix="give 'scratch', an HF nemotron_h checkpoint or a nested checkpoint directory")
        m["init"] = str(p)
    if m["tokenizer"] != "byte":
        p = resolve(m["tokenizer"])
        if not p.exists():
            raise ConfigError(f"{str(p)!r} does not exist", path=path, field="model.tokenizer",
                              fix="give 'byte' or a tokenizer.json path")
        m["tokenizer"] = str(p)

    # budgets
    b = r["budgets"]
    if not b["names"] or len(b["names"]) != len(b["fractions"]):
        raise ConfigError(f"has {len(b['fractions'])} entries for {len(b['names'])} names", path=path,
                          field="budgets.fractions", fix="give one fraction per budget name")
    from elastic_export.search import NAME_RE

    if len(set(b["names"])) != len(b["names"]) or not all(isinstance(n, str) and NAME_RE.match(n) for n in b["names"]):
        raise ConfigError(f"is {b['names']!r}", path=path, field="budgets.names",
                          fix="give distinct names usable as file names (letters, digits, '.', '_', '-'), "
                              "e.g. full, 75pct, 50pct")
    if "full" in b["names"] and b["fractions"][b["names"].index("full")] != 1.0:
        raise ConfigError("the budget named 'full' is the parent: its fraction must be 1.0", path=path,
                          field=f"budgets.fractions[{b['names'].index('full')}]")
    for i, f in enumerate(b["fractions"]):
        if isinstance(f, bool) or not isinstance(f, NUM) or not 0 < f <= 1:
            raise ConfigError(f"is {f!r}; a budget is a fraction of the parent in (0, 1]", path=path,
                              field=f"budgets.fractions[{i}]")

    # router
    ro = r["router"]
    wc = ro["width_choices"]
    if not wc or any(isinstance(f, bool) or not isinstance(f, NUM) or not 0 < f <= 1 for f in wc) or 1.0 not in wc:
        raise ConfigError(f"is {wc!r}", path=path, field="router.width_choices",
                          fix="give fractions in (0, 1] including 1.0")
    for a in ro["axes"]:
        if a not in SCHEMA["router"]["axes"][1]:
            raise ConfigError(f"unknown axis {a!r}", path=path, field="router.axes",
                              fix=f"use some of {', '.join(SCHEMA['router']['axes'][1])}")
    if ro["tau_end"] <= 0 or ro["tau_start"] <= 0:
        raise ConfigError("must be positive", path=path, field="router.tau_end")

    # stages
    if not r["stages"]:
        raise ConfigError("is empty", path=path, field="stages", fix="add at least one [[stages]]")
    stages = []
    for i, s in enumerate(r["stages"]):
        where = f"stages[{i}]."
        if not isinstance(s, dict):
            raise ConfigError("must be a table", path=path, field=where[:-1])
        s = _check_table(s, "stage", where, path)
        for k in ("tokens", "seq_len", "batch_size"):
            if s[k] <= 0:
                raise ConfigError(f"must be positive, got {s[k]}", path=path, field=where + k)
        if s["sampling"] == "weighted" or s["weights"] is not None:
            w = s["weights"]
            if w is None or len(w) != len(b["names"]) or any(isinstance(x, bool) or not isinstance(x, NUM) or x < 0
                                                              for x in w) or sum(w) <= 0:
                raise ConfigError(f"is {w!r}", path=path, field=where + "weights",
                                  fix=f"weighted sampling needs {len(b['names'])} non-negative weights, one per budget")
        per_step = s["batch_size"]
        if per_step % r["train"]["grad_accum"]:
            raise ConfigError(f"{per_step} is not divisible by train.grad_accum={r['train']['grad_accum']}",
                              path=path, field=where + "batch_size")
        stages.append(s)
    r["stages"] = stages
    fa = ro["freeze_after"]
    if fa is not None and fa != "start" and fa not in [s["name"] for s in stages if s["kind"] == "elastic"]:
        raise ConfigError(f"is {fa!r}, not the name of an elastic stage", path=path, field="router.freeze_after",
                          fix="name the elastic stage after which the router's choices are fixed (e.g. 'stage1'), "
                              "or 'start' for architectures from the importance search with no router")
    if r["train"]["grad_accum"] < 1:
        raise ConfigError("must be at least 1", path=path, field="train.grad_accum")
    if r["train"]["checkpoint_every"] < 1:
        raise ConfigError("must be at least 1", path=path, field="train.checkpoint_every")
    r["output"]["path"] = str(resolve(r["output"]["path"])) if r["output"]["path"] else None

    check_parent(r, path)
    return r


def parent_config(r: dict, path=None):
    """The parent's ModelConfig (from [model.config] or the checkpoint), with errors naming the field."""
    from elastic_export.config import ModelConfig, PATTERN_CHARS

    m = r["model"]
    if m["init"] != "scratch":
        if (Path(m["init"]) / "elastic.json").is_file():  # a nested checkpoint: its (sorted) parent
            from elastic_export.nested import read_manifest

            return read_manifest(m["init"])[1]
        from elastic_export.hf_io import load_config

        return load_config(m["init"])
    raw = dict(m["config"])
    if "pattern" in raw:  # shorthand: M (Mamba2), * (attention), - (MLP), E (MoE)
        pattern = raw.pop("pattern")
        if not isinstance(pattern, str) or set(pattern) - set(PATTERN_CHARS):
            raise ConfigError(f"is {pattern!r}", path=path, field="model.config.pattern",
                              fix="use M (Mamba2), * (attention), - (MLP), E (MoE)")
        raw["layers_block_type"] = [PATTERN_CHARS[c] for c in pattern]
    raw.setdefault("head_order", "rank_major")  # trained from scratch in the nested order
    import dataclasses

    names = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    for k in raw:
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            raise ConfigError("unknown field", path=path, field=f"model.config.{k}",
                              fix=f"did you mean '{close[0]}'?" if close else None)
    try:
        return ModelConfig(**raw)
    except ConfigError as e:
        raise ConfigError(str(e).split(": ", 1)[-1], path=path, field=f"model.config.{e.field}") from None
    except TypeError as e:
        raise ConfigError(f"is incomplete ({e})", path=path, field="model.config") from None


def check_parent(r: dict, path=None) -> None:
    """Refuse budgets the parent cannot reach and axes its head order cannot prefix."""
    cfg = parent_config(r, path)
    tok = r["model"]["tokenizer"]
    if tok == "byte":
        from elastic_export.tokenizer import ByteTokenizer

        if cfg.vocab_size < ByteTokenizer.vocab_size:
            raise ConfigError(f"{cfg.vocab_size} is smaller than the byte tokenizer's {ByteTokenizer.vocab_size}",
                              path=path, field="model.config.vocab_size")
    ro = r["router"]
    if ro["max_dropped_layers"] >= cfg.num_hidden_layers:
        raise ConfigError(f"{ro['max_dropped_layers']} would drop every layer", path=path,
                          field="router.max_dropped_layers")
    if ro["depth_ranking"] is not None and sorted(ro["depth_ranking"]) != list(range(cfg.num_hidden_layers)):
        raise ConfigError("must be a permutation of the layer indices", path=path, field="router.depth_ranking")
    space = make_space(cfg, r)
    if ro["depth_ranking"] is None:  # ranked at the elastic start; check with the most favourable order
        from .space import layer_params

        full_dims = space.widths(lambda ax, row, k=None: ax.values[row][-1] if k is None else int(k == 0))
        sizes = [layer_params(cfg, t, cfg.hidden_size, w) for t, w in zip(cfg.layers_block_type, full_dims[2])]
        space.depth_ranking = sorted(range(cfg.num_hidden_layers), key=lambda j: -sizes[j])
    full = space.subnet_cost(space.subnet(space.extreme_index(True)), ro["budget_metric"], ro["memory_context"])
    least = space.subnet_cost(space.subnet(space.extreme_index(False)), ro["budget_metric"], ro["memory_context"])
    for i, f in enumerate(r["budgets"]["fractions"]):
        if f < 1 and f * full < least * (1 - ro["tolerance"]):
            raise ConfigError(f"{f:g} of the parent ({int(f * full):,} {ro['budget_metric']}) is below the smallest "
                              f"configuration the router can choose ({least:,})", path=path,
                              field=f"budgets.fractions[{i}]",
                              fix="raise the fraction, or add smaller router.width_choices / max_dropped_layers")


def make_space(cfg, r: dict):
    from .space import ElasticSpace

    ro = r["router"]
    return ElasticSpace(cfg, ro["width_choices"], ro["axes"], ro["heterogeneous"], ro["max_dropped_layers"],
                        ro["depth_ranking"], ro["embedding_multiple"])
