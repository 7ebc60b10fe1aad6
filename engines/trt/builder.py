"""Build TensorRT engines from the exported ONNX graphs (prefill and decode, `plugin` SSM mode).

- Strongly typed networks: the ONNX graph's dtypes (BF16 weights and activations, float32 SSM
  state) are the engine's; TensorRT 11 has no other mode and 10.x has had it since 10.0.
- Optimization profiles over the dynamic dims, given by name: the ONNX dim_param of each dynamic
  axis maps to (min, opt, max). The exporter's names (elastic_export/onnx_export.py): ``batch``;
  ``seq`` (prefill tokens: input_ids and attention_mask [batch, seq]); in decode graphs ``past``
  (the cached KV length of past.*.key/value) and ``total`` = past + 1 (attention_mask [batch, total],
  over every token so far including the new one). :func:`profile_dims` gives ranges that keep
  total = past + 1 at min, opt and max, within one context length. A dim name with no range is an
  error naming it (never silently aliased). A graph that takes past states (length 0 allowed)
  could serve prefill and decode from ONE engine with two profiles; the exporter writes separate
  prefill and decode graphs, which give two engines, one profile each.
- A timing cache file is loaded before and saved (merged) after each build, so rebuilding another
  budget or the same one again skips kernel timing it has seen.
- Weights: a graph per budget gives an engine per budget, each holding its own weights on the GPU;
  :func:`build_family` records every engine's bytes in the manifest so the cost is stated. A family
  graph whose budget is an input (one graph for all budgets) builds into one engine, weights once.

Every function here imports tensorrt lazily; :func:`engines.trt.require` should run first.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from elastic_export.hf_io import atomic_write_bytes

MANIFEST = "trt_manifest.json"

MAX_BATCH, OPT_BATCH = 8, 1
MAX_CONTEXT, OPT_CONTEXT = 4096, 256  # tokens: prompt + generated


def profile_dims(max_batch: int = MAX_BATCH, max_context: int = MAX_CONTEXT, opt_batch: int = OPT_BATCH,
                 opt_context: int = OPT_CONTEXT) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Ranges (min, opt, max) of every dynamic dim name, per profile, for up to ``max_context`` tokens.

    prefill: seq 1..max_context (a unified graph's past inputs: 0). decode: seq 1 (a unified graph's
    input_ids), past 1..max_context-1 and total = past + 1, 2..max_context."""
    if not (1 <= opt_batch <= max_batch and 2 <= opt_context <= max_context):
        raise ValueError(f"bad profile ranges: batch {opt_batch}/{max_batch}, context {opt_context}/{max_context}")
    batch = (1, opt_batch, max_batch)
    past = (1, opt_context - 1, max_context - 1)
    return {"prefill": {"batch": batch, "seq": (1, opt_context, max_context), "past": (0, 0, 0)},
            "decode": {"batch": batch, "seq": (1, 1, 1), "past": past, "total": tuple(p + 1 for p in past)}}


PROFILES = profile_dims()
PREFILL_DIMS, DECODE_DIMS = PROFILES["prefill"], PROFILES["decode"]
DIM_ALIASES = {"batch": ("batch", "batch_size", "b"), "seq": ("seq", "sequence", "seq_len", "l", "length"),
               "past": ("past", "past_len", "past_length", "past_seq"),
               "total": ("total", "total_len", "total_length")}


def onnx_input_dims(onnx_path: str | Path) -> dict[str, list]:
    """Input name -> dims (int for static, the dim_param string for dynamic); weights not loaded."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = []
        for d in inp.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        out[inp.name] = dims
    return out


def _range_of(name: str, dims: dict[str, tuple[int, int, int]]) -> tuple[int, int, int] | None:
    if name in dims:
        return dims[name]
    for key, aliases in DIM_ALIASES.items():
        if name.lower() in aliases and key in dims:
            return dims[key]
    return None


def profile_shapes(onnx_path: str | Path, dims: dict[str, tuple[int, int, int]]) -> dict[str, tuple]:
    """Input name -> (min, opt, max) shapes, each dynamic dim resolved by name through ``dims``."""
    shapes = {}
    for name, ds in onnx_input_dims(onnx_path).items():
        mins, opts, maxs = [], [], []
        for d in ds:
            if isinstance(d, int) and d > 0:
                mins.append(d), opts.append(d), maxs.append(d)
                continue
            r = _range_of(str(d), dims)
            if r is None:
                raise ValueError(f"{onnx_path}: input {name!r} has a dynamic dim {d!r} with no range; "
                                 f"give one in dims (known: {sorted(dims)})")
            mins.append(r[0]), opts.append(r[1]), maxs.append(r[2])
        shapes[name] = (tuple(mins), tuple(opts), tuple(maxs))
    return shapes




def build_engine(onnx_path: str | Path, engine_path: str | Path, profiles: dict[str, dict[str, tuple]],
                 timing_cache: str | Path | None = None, workspace_bytes: int | None = None,
                 verbose: bool = False) -> dict:
    """Parse ``onnx_path`` (the plugin registered first), build a strongly typed engine with one
    optimization profile per entry of ``profiles`` ({name: dims}, in order: profile index = position),
    write it atomically. Returns facts for the manifest."""
    import tensorrt as trt

    from .plugin import register

    register()
    t0 = time.time()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for dims in profiles.values():
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profile_shapes(onnx_path, dims).items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    data = bytes(serialized)
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(engine_path, data)
    if cache_path:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return {"file": engine_path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "onnx": Path(onnx_path).name, "profiles": {p: {k: list(v) for k, v in d.items()} for p, d in profiles.items()},
            "build_seconds": round(time.time() - t0, 2), "tensorrt": trt.__version__}


def build_family(graphs: dict[str, dict[str, str | Path]], out_dir: str | Path,
                 profiles: dict[str, dict] | None = None, timing_cache: str | Path | None = None,
                 verbose: bool = False) -> dict:
    """Engines for every budget into ``out_dir``, with a manifest.

    ``graphs[budget]`` is ``{"model": onnx}`` (one graph with past-state inputs: one engine, profiles
    prefill and decode) or ``{"prefill": onnx, "decode": onnx}`` (two engines, one profile each).
    The manifest (``trt_manifest.json``) lists each engine with its bytes, SHA-256 and profiles, and
    ``weights_note`` states what the set costs on the GPU when every budget is loaded.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timing_cache = timing_cache or out_dir / "timing.cache"
    profiles = profiles or PROFILES
    manifest = {"format": 1, "kind": "tensorrt", "budgets": {}}
    for budget, kinds in graphs.items():
        entry = {}
        for kind, onnx_path in kinds.items():
            chosen = profiles if kind == "model" else {kind: profiles[kind]}
            entry[kind] = build_engine(onnx_path, out_dir / f"{budget}.{kind}.engine", chosen,
                                       timing_cache=timing_cache, verbose=verbose)
        manifest["budgets"][budget] = entry
    per_budget = {b: sum(e["bytes"] for e in kinds.values()) for b, kinds in manifest["budgets"].items()}
    total = sum(per_budget.values())
    manifest["budget_engine_bytes"] = per_budget
    manifest["total_engine_bytes"] = total
    manifest["weights_note"] = (
        "one engine per budget and graph (the budgets are different graphs, so they cannot be optimization "
        "profiles of one engine): each engine holds its own copy of its weights, so serving every budget "
        f"costs about {total / 2**20:.1f} MiB of GPU memory for engines (per budget: "
        + ", ".join(f"{b} {n / 2**20:.1f} MiB" for b, n in per_budget.items()) + ")"
        if sum(len(k) for k in graphs.values()) > 1 else "a single engine: weights exist once on the GPU")
    atomic_write_bytes(out_dir / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest
