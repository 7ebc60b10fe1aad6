"""The `elastic-export` command line.

Every command imports its machinery lazily, so ``elastic-export --help`` stays fast and a CPU
machine never imports GPU packages. Bad input (an ElasticExportError) prints one line and exits 2.
"""

from __future__ import annotations

import functools
import sys

import click


def user_errors(fn):
    """Turn ElasticExportError (and a missing file) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import ElasticExportError

        try:
            return fn(*args, **kwargs)
        except ElasticExportError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="elastic-export")
def main():
    """Train, slice, export and serve elastic hybrid Mamba2-Attention models."""


# ---- foundation --------------------------------------------------------------------------------

@main.command()
@click.argument("path", required=False)
@click.option("--preset", help="Inspect a built-in config instead (e.g. nemotron-nano-v2-12b).")
@user_errors
def inspect(path, preset):
    """Layer table, parameter counts and sizes of a checkpoint, a nested checkpoint or a config.json
    (no weights needed). With neither PATH nor --preset: the shipped default model."""
    from .inspect import inspect_text, nested_summary, resolve_config, weights_summary
    from .nested import is_nested

    path = _default(path) if not preset else path
    if path is not None and is_nested(path):
        click.echo(nested_summary(path))
        return
    cfg = resolve_config(path, preset)
    click.echo(inspect_text(cfg, weights_summary(None if preset else path, cfg)))


def _default(path: str | None) -> str:
    """The checkpoint a command works on: the given one, else the shipped default model."""
    from .build import default_model_path

    return path if path is not None else str(default_model_path())


# ---- elastic core: rank, plan, nest, slice -----------------------------------------------------

def _open_parent(path: str) -> tuple:
    """(config, read-only hf_io.CheckpointReader, importance or None, tokenizer dir or None) of a nested
    or an HF checkpoint, checked from the headers; the weights are read when used, one tensor at a time."""
    from pathlib import Path

    from .hf_io import open_checkpoint
    from .nested import is_nested, open_nested, read_importance

    tok = Path(path) / "tokenizer"
    tok = tok if tok.is_dir() else None
    if is_nested(path):
        _, cfg, _, reader = open_nested(path)
        return cfg, reader, read_importance(path, cfg, verify=False), tok  # verified by open_nested
    cfg, reader = open_checkpoint(path)
    return cfg, reader, None, tok


_search_options = [
    click.option("--budget", "budgets", multiple=True, required=True,
                 help="75%, 9B, 300M, NAME=SPEC or [NAME=]subnet.json (repeatable); MoE parents also "
                      "TOTAL/ACTIVE (23B/2.8B) to bound the active parameters."),
    click.option("--mode", type=click.Choice(["homogeneous", "heterogeneous"]), default="homogeneous",
                 show_default=True, help="One width per axis, or one per layer."),
    click.option("--divisor", type=int, default=None, help="Embedding width (and FFN) multiple [64 at scale]."),
    click.option("--depth/--no-depth", default=None, help="Allow dropping layers along the depth ranking "
                 "[on when depth ranks are present]."),
]


def search_options(fn):
    for opt in reversed(_search_options):
        fn = opt(fn)
    return fn


def _plan(cfg, importance, budgets, mode, divisor, depth):
    from .search import plan_budgets

    return plan_budgets(cfg, list(budgets), mode=mode, importance=importance, embed_divisor=divisor,
                        ffn_divisor=divisor, depth=depth)


@main.command()
@click.argument("parent", required=False)
@click.option("--calib", multiple=True, required=True, help="Token files (.npy/.bin/.txt ids) or text files.")
@click.option("--out", required=True, help="Output: a nested checkpoint with the sorted weights and scores.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per calibration window.")
@click.option("--samples", default=64, show_default=True, help="Calibration windows at most.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--depth", "depth_mode", type=click.Choice(["oneshot", "iterative", "none"]), default="oneshot",
              show_default=True, help="Depth ranking by normalized logit MSE (Eq. 5).")
@click.option("--head-channels", type=int, default=None, help="Top channels scoring Mamba heads (Eq. 4) [all].")
@click.option("--tokenizer", default=None, help="Tokenizer for text files [the parent's, else byte-level].")
@click.option("--dtype", default=None, help="Save dtype of the sorted weights [as stored].")
@click.option("--compute-dtype", default=None, help="Dtype of the calibration passes (the scores accumulate in "
              "float32 or wider whatever it is) [--dtype, else as stored].")
@click.option("--device", default="cpu", show_default=True, help="Where the calibration passes run: cpu or cuda[:N].")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bars with time estimates on stderr.")
@user_errors
def rank(parent, calib, out, seq_len, samples, batch_size, depth_mode, head_channels, tokenizer, dtype, compute_dtype,
         device, progress):
    """Rank every elastic axis on calibration data and sort the parent's weights (nested order)."""
    import gc
    import time

    import torch

    from .hf_io import expected_shapes, model_from, parse_dtype
    from .importance import PAPER_CALIB_TOKENS, compute_importance, compute_device, load_calibration
    from .nested import save_nested_state
    from .sorting import permutations, permute_importance, sorted_entries
    from .tokenizer import load_tokenizer

    dev = compute_device(device)
    save_dtype = parse_dtype(dtype)
    cfg, reader, _, tok_dir = _open_parent(_default(parent))
    # the calibration model: views of the read-only map where the compute dtype is the stored one
    model = model_from(cfg, reader, parse_dtype(compute_dtype) or save_dtype, dev)
    tok = load_tokenizer(tokenizer or tok_dir)
    ids = load_calibration(calib, cfg.vocab_size, seq_len, samples, tok)
    t0 = time.perf_counter()
    imp = compute_importance(model.eval(), ids, batch_size, depth_mode, head_channels, progress)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    reader.drop_pages()
    # the sorted weights, from the stored tensors (not the compute copy), one tensor at a time
    perms = permutations(cfg, imp)
    specs = {n: reader.specs()[n] for n in expected_shapes(cfg)}
    save_nested_state(out, cfg.replace(head_order="rank_major"), sorted_entries(cfg, specs, reader.tensor, perms), {},
                      importance=permute_importance(cfg, imp, perms), tokenizer=tokenizer or tok_dir,
                      dtype=save_dtype, after=lambda _: reader.drop_pages())
    per_token = seconds / ids.numel()
    click.echo(f"ranked on {ids.shape[0]} x {ids.shape[1]} tokens in {seconds:.1f} s")
    click.echo(f"{per_token:.3g} s per calibration token on {dev} ({depth_mode} depth, {ids.shape[1]}-token windows); "
               f"the paper's 1024 x 8192 tokens: about {per_token * PAPER_CALIB_TOKENS / 3600:.3g} h "
               "(scaled linearly; attention grows with the window length)")
    if imp.depth_order is not None:
        click.echo(f"depth order (least important first): {imp.depth_order}")
    click.echo(f"wrote {out} (sorted weights, rank-major heads, scores)")


@main.command()
@click.argument("parent", required=False)
@click.option("--preset", help="Plan on a built-in config instead (e.g. nemotron-nano-v2-12b).")
@search_options
@click.option("--context", default=8192, show_default=True, help="Context length for the memory table.")
@click.option("--batch", default=1, show_default=True, help="Batch size for the memory table.")
@click.option("--dtype", default="bfloat16", show_default=True, help="Weight dtype for the memory table.")
@click.option("--json", "json_out", default=None, help="Also write the budgets (subnets) to this JSON file.")
@user_errors
def plan(parent, preset, budgets, mode, divisor, depth, context, batch, dtype, json_out):
    """Choose subnets for parameter targets and print them with a memory table (config alone suffices)."""
    import json

    from .accounting import count_params
    from .hf_io import atomic_write_text, parse_dtype
    from .inspect import resolve_config
    from .nested import is_nested, read_importance, read_manifest

    parse_dtype(dtype)
    importance = None
    if preset is None:
        parent = _default(parent)
    if parent is not None and is_nested(parent):
        _, cfg, _ = read_manifest(parent)
        importance = read_importance(parent, cfg)
    else:
        cfg = resolve_config(parent, preset)
    chosen = _plan(cfg, importance, budgets, mode, divisor, depth)
    from .search import plan_text

    if importance is None:
        click.echo("no importance scores: every channel, head and neuron counts alike\n")
    click.echo(plan_text(cfg, chosen, dtype, context, batch))
    if json_out:
        atomic_write_text(json_out, json.dumps({n: {"params": count_params(cfg, s), **s.to_dict()}
                                                for n, s in chosen.items()}, indent=2) + "\n")


@main.command()
@click.argument("parent_sorted", required=False)
@search_options
@click.option("--out", required=True, help="Output nested checkpoint directory.")
@click.option("--dtype", default=None, help="Save dtype [as stored].")
@user_errors
def nest(parent_sorted, budgets, mode, divisor, depth, out, dtype):
    """A nested checkpoint from a sorted parent with budgets chosen by the pruning baseline (no training)."""
    from .hf_io import reader_entries
    from .nested import check_budgets, save_nested_state
    from .search import plan_text

    cfg, reader, importance, tok_dir = _open_parent(_default(parent_sorted))
    chosen = _plan(cfg, importance, budgets, mode, divisor, depth)
    check_budgets(cfg, chosen)  # refuse before warning or writing
    if importance is None:
        click.echo("warning: the parent carries no importance scores (run `elastic-export rank` first); "
                   "budgets are prefixes of the weights as stored", err=True)
    # the weights as stored (cast to --dtype), read and written one tensor at a time
    save_nested_state(out, cfg, reader_entries(cfg, reader), chosen, importance=importance, tokenizer=tok_dir,
                      dtype=dtype, after=lambda _: reader.drop_pages())
    click.echo(plan_text(cfg, chosen))
    click.echo(f"wrote {out}")


@main.command(name="slice")
@click.argument("nested", required=False)
@click.option("--budget", "budget", required=True, help="A budget name from the manifest, or 'all'.")
@click.option("--out", required=True, help="Output checkpoint directory (with 'all': one subdirectory per budget).")
@click.option("--dtype", default=None, help="Save dtype [as stored].")
@click.option("--layout", type=click.Choice(["padded", "compact"]), default="padded", show_default=True,
              help="Heterogeneous budgets: padded = a plain nemotron_h checkpoint every reader loads (narrower "
                   "layers zero-padded); compact = per-layer widths, smallest, elastic_export.load only.")
@click.option("--uniform-groups", is_flag=True, help="Quantized checkpoints: write every tensor at the smallest "
              "block (one compressed-tensors config group; transformers' loader needs it when blocks differ).")
@user_errors
def slice_cmd(nested, budget, out, dtype, layout, uniform_groups):
    """Standalone checkpoints of nested budgets (plain HF nemotron_h unless --layout compact); of a
    quantized nested checkpoint, quantized ones in the compressed-tensors layout."""
    import shutil

    from .accounting import count_params
    from .hf_io import atomic_dir, parse_dtype
    from .model import build_model
    from .nested import load_nested
    from .padding import eps_factors, layout_of
    from .qcheckpoint import is_quantized_nested, slice_quantized_dir
    from .slicing import save_slice

    dt = parse_dtype(dtype)
    if is_quantized_nested(_default(nested)):
        return slice_quantized_dir(_default(nested), budget, out, layout, uniform_groups, dt, click.echo)
    ck = load_nested(_default(nested), writable=False)  # read-only map: its pages are dropped behind each tensor
    names = list(ck.budgets) if budget == "all" else [budget]
    subnets = {n: ck.subnet(n) for n in names}  # unknown names fail here, before any write
    with atomic_dir(out) as tmp:
        for n, s in subnets.items():
            target = tmp / n if budget == "all" else tmp
            cfg = save_slice(ck.model, s, target, layout=layout, dtype=dt, after=lambda _: ck.drop_pages())
            if ck.tokenizer_path is not None:
                shutil.copytree(ck.tokenizer_path, target / "tokenizer")
            kind = {"compact": "compact, per-layer widths (elastic_export.load only)",
                    "padded": "padded HF nemotron_h", "plain": "HF nemotron_h"}[layout_of(cfg)]
            real = "" if layout_of(cfg) != "padded" else f" ({count_params(ck.model.config, s):,} without padding)"
            where = f"{out}/{n}" if budget == "all" else out
            click.echo(f"{n}: {build_model(cfg, device='meta').num_parameters():,} parameters{real}, {kind} -> {where}")
            if layout == "padded" and (k := eps_factors(cfg)):
                click.echo(f"  note: padded Mamba layers {', '.join(f'{i} (x{f:.3g})' for i, f in k.items())} run with "
                           "their gated-norm epsilon multiplied as shown (see elastic_export/padding.py); "
                           "--layout compact is exact", err=True)



@main.command()
@click.argument("nested", required=False)
@click.option("--quant", "fmt", type=click.Choice(["int8", "int4", "fp8"]), required=True, help="Weight format.")
@click.option("--block", type=int, default=None, help="Input columns per scale [int4 32, int8 and fp8 128]; a "
              "tensor gets the largest power of two <= this that every budget keeps whole.")
@click.option("--method", type=click.Choice(["rtn", "mse"]), default=None,
              help="Scales: rtn = absmax (round to nearest); mse = the clip minimizing squared error, weighted by "
                   "input activations with --calib [mse with --calib, else rtn].")
@click.option("--calib", multiple=True, help="Calibration token or text files (as for rank): activation-aware scales.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per calibration window.")
@click.option("--samples", default=64, show_default=True, help="Calibration windows at most.")
@click.option("--tokenizer", default=None, help="Tokenizer for text files [the checkpoint's, else byte-level].")
@click.option("--min-block", default=8, show_default=True, help="Refuse a tensor whose block would fall below this.")
@click.option("--quant-embeddings/--no-quant-embeddings", default=True, show_default=True)
@click.option("--quant-lm-head/--no-quant-lm-head", default=True, show_default=True)
@click.option("--out", "-o", required=True, help="Output: a quantized nested checkpoint.")
@user_errors
def quantize(nested, fmt, block, method, calib, seq_len, samples, tokenizer, min_block, quant_embeddings,
             quant_lm_head, out):
    """A quantized nested checkpoint: one copy of codes + scales that every budget slices (int8 / int4 /
    fp8 weights; norms, conv, SSM parameters and MoE routers stay float). Load, slice and run read it."""
    from .errors import ConfigError
    from .qcheckpoint import quantize_nested
    from .quant import QuantSpec

    src = _default(nested)
    if method == "rtn" and calib:
        raise ConfigError("--calib weights the scale search of --method mse", field="--method",
                          fix="drop --method rtn (mse is the default with --calib) or drop --calib")
    spec = QuantSpec(fmt, block, method or ("mse" if calib else "rtn"), quant_embeddings, quant_lm_head, min_block)
    ids = info = None
    if calib:
        from .importance import load_calibration
        from .nested import read_manifest
        from .tokenizer import load_tokenizer
        from pathlib import Path

        _, cfg, _ = read_manifest(src)
        tok_dir = Path(src) / "tokenizer"
        ids = load_calibration(calib, cfg.vocab_size, seq_len, samples,
                               load_tokenizer(tokenizer or (tok_dir if tok_dir.is_dir() else None)))
        info = {"files": [Path(c).name for c in calib], "windows": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
    entry = quantize_nested(src, out, spec, ids, info, progress=lambda m: click.echo(m, err=True))
    blocks: dict[int, int] = {}
    for b in entry["plan"].values():
        blocks[b] = blocks.get(b, 0) + 1
    click.echo(f"quantized {len(entry['plan'])} tensors to {fmt} ({spec.method}"
               f"{', activation-aware' if calib else ''}); blocks: "
               + ", ".join(f"{n} x {b}" for b, n in sorted(blocks.items(), reverse=True)))
    if min(blocks, default=spec.block_size) < spec.block_size:
        click.echo(f"  note: blocks below {spec.block_size} are where a budget's widths (or head widths) are not "
                   f"multiples of {spec.block_size}", err=True)
    click.echo(f"wrote {out}")


# ---- training: train ---------------------------------------------------------------------------

@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", help="Run directory (checkpoints, metrics.jsonl); default: the recipe's `out`.")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming from OUT/checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs still go to metrics.jsonl).")
@click.option("--parallel", type=click.Choice(["ddp", "fsdp2"]), default=None,
              help="Override the recipe's train.parallel: ddp (whole model per process) or fsdp2 (sharded).")
@user_errors
def train(recipe, out, fresh, no_progress, parallel):
    """Train a recipe: pretrain a parent and/or elastify it; writes a nested checkpoint.

    Runs on N processes unchanged: torchrun --nproc-per-node N -m elastic_export.cli train RECIPE
    (--parallel fsdp2 shards the model over them: docs/training.md).
    """
    from training.recipe import load_recipe
    from training.trainer import train as run_training

    r = load_recipe(recipe)
    if parallel is not None:
        r["train"]["parallel"] = parallel
    path = run_training(r, out=out, resume=not fresh, progress=False if no_progress else None)
    if path is not None:
        click.echo(f"nested checkpoint: {path}")



# ---- build and run: build, run -----------------------------------------------------------------

@main.command()
@click.argument("source", required=False)
@click.option("--budget", "budgets", multiple=True, default=("all",), show_default=True,
              help="Budget name(s) to build, or 'all' (a plain HF checkpoint has one: full).")
@click.option("--target", type=click.Choice(["onnx", "trt", "gguf", "auto"]), default="auto", show_default=True,
              help="auto: TensorRT where TensorRT and a CUDA GPU are present, else ONNX. gguf: one GGUF file per "
                   "budget for llama.cpp (Ollama, LM Studio).")
@click.option("--ssm-op", type=click.Choice(["standard", "decomposed", "plugin"]), default=None,
              help="How the SSM scan is expressed in ONNX (default: standard for ONNX Runtime, decomposed for "
                   "--quant builds (faster on a CPU); plugin for TensorRT, or decomposed where tensorrt.plugin is "
                   "missing).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default=None,
              help="Stored weight dtype [as the source is stored: bf16 stays bf16; fp16 becomes fp32].")
@click.option("--compute-dtype", type=click.Choice(["fp32", "bf16"]), default=None,
              help="The graphs' arithmetic [fp32 for ONNX (ONNX Runtime on a CPU upcasts bf16 weights once, "
                   "in memory); TensorRT computes at --dtype].")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the lowest the SSM op allows).")
@click.option("--gguf-type", "gguf_types", multiple=True, default=("f32",), show_default=True,
              type=click.Choice(["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]),
              help="--target gguf: the matrices' type (repeat for several files per budget); norms and SSM "
                   "parameters stay f32.")
@click.option("--quant", type=click.Choice(["int8", "int4", "fp8"]), default=None,
              help="Weight-only quantized ONNX graphs (MatMulNBits / DequantizeLinear), one quantized copy for "
                   "every budget; see docs/quantization.md.")
@click.option("--quant-block", type=int, default=None, help="--quant: column block (default: 128 int8/fp8, 32 int4).")
@click.option("--quant-accuracy", type=click.Choice(["0", "4"]), default="4", show_default=True,
              help="--quant: MatMulNBits accuracy_level; 4 quantizes activations to int8 (fast), 0 computes in float32.")
@click.option("--out", required=True, type=click.Path(), help="Build directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@user_errors
def build(source, budgets, target, ssm_op, dtype, compute_dtype, opset, gguf_types, quant, quant_block,
          quant_accuracy, out, overwrite):
    """Build ONNX graphs (or TensorRT engines) for budgets of a checkpoint: a nested one, a plain HF
    nemotron_h one or one of our slices (one budget, full) [default: the shipped model]."""
    import time

    from .build import build as onnx_build, read_build
    run_build = onnx_build
    if quant is not None and target in ("gguf", "trt"):
        from .errors import ConfigError

        raise ConfigError(f"--quant is not built for --target {target}", field="--quant",
                          fix="gguf: use --gguf-type q8_0 / q4_0; trt: build --target onnx --quant fp8|int8 gives "
                              "the Q/DQ graphs TensorRT parses (docs/quantization.md)")
    if target == "gguf":
        from .gguf_export import build_gguf

        t0 = time.perf_counter()
        path = build_gguf(source, out, budgets=budgets, gguf_types=gguf_types, overwrite=overwrite,
                          progress=lambda msg: click.echo(msg, err=True))
        m = read_build(path)
        size = sum(f["bytes"] for f in m["files"].values())
        click.echo(f"built {', '.join(m['budgets'])} (gguf, {m['dtype']}) into {path}: {size / 1e6:.1f} MB in "
                   f"{time.perf_counter() - t0:.1f} s; run a file with llama.cpp, e.g. llama-cli -m {path}/"
                   f"{next(iter(m['budgets']))}.{m['gguf_types'][0]}.gguf")
        return
    kw = {"compute_dtype": compute_dtype}
    if quant is not None:
        kw.update(quant=quant, quant_block=quant_block, quant_accuracy=int(quant_accuracy))
        if target == "auto":
            target = "onnx"  # quantized builds are ONNX graphs (TensorRT parses their Q/DQ form)
    if target != "onnx":  # TensorRT lives in engines/, imported only when asked for
        from engines.trt.target import build_trt, resolve_target

        if resolve_target(target) == "trt":
            if compute_dtype not in (None, dtype):
                from .errors import ConfigError

                raise ConfigError("a TensorRT build computes at its stored dtype", field="--compute-dtype",
                                  fix="give --dtype alone (bf16 for a BF16 network)")
            run_build, kw = build_trt, {}
    t0 = time.perf_counter()
    path = run_build(source, out, budgets=budgets, ssm_op=ssm_op, dtype=dtype, opset=opset,
                     overwrite=overwrite, progress=lambda msg: click.echo(msg, err=True), **kw)
    m = read_build(path)
    size = sum(f["bytes"] for f in m.get("files", {}).values())
    kind = m.get("dtype") if "quant" not in m else m["quant"]["format"]
    click.echo(f"built {', '.join(m['budgets'])} ({m['target']}, {m.get('ssm_op')}, {kind} weights, "
               f"{m.get('compute_dtype')} compute) into {path}: "
               f"{size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")


@main.command()
@click.argument("path", required=False)
@click.option("--budget", help="Budget to run (default: the largest).")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 100000))
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--threads", default=None, type=int, help="CPU threads (default: the runtime's choice).")
@click.option("--static", is_flag=True, help="Torch engine: compile a fixed-shape decode step (faster decode, "
              "seconds of compilation first).")
@click.option("--dtype", default=None, help="Torch engine: weight and compute dtype, float32 or bfloat16 [as stored; "
              "float32 may be faster on a CPU without bf16 instructions].")
@click.option("--reason-budget", default=None, help="Budget control: this budget writes until --switch-at ...")
@click.option("--answer-budget", default=None, help="... then this one (the generated text is re-prefilled with it).")
@click.option("--switch-at", default="####", show_default=True,
              help="Where the reason budget stops: a string (e.g. '</think>'; included) or a token count.")
@click.option("--draft", default=None, help="Self-speculative decoding: this budget drafts, --budget (default: the "
              "largest) verifies; the output is the verify budget's own.")
@click.option("--draft-len", default="4", show_default=True, help="Tokens drafted per verification, or 'auto'.")
@click.option("--ort-weights", type=click.Choice(["float32", "stored"]), default=None,
              help="ONNX Runtime over a bf16 build (float32 arithmetic on a CPU): upcast the weights once (twice "
              "the file's bytes; fast) [float32], or keep them bf16 and cast each per call (the file's bytes; "
              "decode several times slower). The tokens are the same.")
@user_errors
def run(path, budget, prompt, max_new_tokens, temperature, threads, static, dtype, reason_budget, answer_budget,
        switch_at, draft, draft_len, ort_weights):
    """Generate text from a build directory (ONNX Runtime / TensorRT) or a checkpoint (torch engine).

    With no PATH it runs the shipped default model with the torch engine."""
    import time
    from pathlib import Path

    import torch

    from .tokenizer import load_tokenizer

    from .hf_io import parse_dtype

    from .errors import ConfigError

    p = Path(_default(path))
    dt = parse_dtype(dtype)
    if (reason_budget is None) != (answer_budget is None):
        raise ConfigError("budget control needs both budgets", field="--reason-budget/--answer-budget",
                          fix="give --reason-budget and --answer-budget together")
    if draft is not None and reason_budget is not None:
        raise ConfigError("--draft and a budget schedule cannot be combined", field="--draft",
                          fix="give either --draft or --reason-budget/--answer-budget")
    if draft_len != "auto" and not (draft_len.isdigit() and int(draft_len) >= 1):
        raise ConfigError(f"--draft-len {draft_len!r} is neither a positive integer nor 'auto'", field="--draft-len",
                          fix="use e.g. --draft-len 4 or --draft-len auto")
    if static and (draft or reason_budget):
        raise ConfigError("--static decodes one budget on fixed buffers", field="--static",
                          fix="drop --static with --draft or --reason-budget")
    if dt is not None and (p / "build.json").is_file():
        raise ConfigError("--dtype applies to the torch engine; a build directory runs at the dtype it was built "
                          "with", field="--dtype", fix="give a nested checkpoint, or rebuild with build --dtype")
    if ort_weights is not None and not (p / "build.json").is_file():
        raise ConfigError("--ort-weights applies to ONNX Runtime over a build directory", field="--ort-weights",
                          fix="give a build directory (elastic-export build), or drop --ort-weights")
    if (p / "build.json").is_file():
        from .build import read_build, verify_build

        m = read_build(p)
        if m["target"] == "gguf":
            from .errors import ConfigError

            raise ConfigError("holds GGUF files, which llama.cpp runs", path=p / "build.json", field="target",
                              fix=f"llama-cli -m {p}/<budget>.<type>.gguf, or run the checkpoint it was built from")
        verify_build(p)  # every file against its recorded SHA-256
        if m["target"] == "trt":
            from engines import trt
            from engines.trt.engine import TrtEngine

            if ort_weights is not None:
                raise ConfigError("--ort-weights applies to ONNX Runtime; this is a TensorRT build",
                                  path=p / "build.json", field="--ort-weights", fix="drop --ort-weights")
            trt.require(need_plugin=m["ssm_op"] == "plugin")
            engine = TrtEngine(p)
        else:
            from engines.ort_engine import OrtEngine

            engine = OrtEngine(p, budgets=[budget] if budget and not (draft or reason_budget) else None,
                               threads=threads, upcast=ort_weights != "stored")
        tok_dir = p / m["tokenizer"] if m.get("tokenizer") else None
        eos = m["config"].get("eos_token_id")
    else:
        from engines.torch_engine import TorchEngine

        from .build import load_family

        model, family, src = load_family(p)
        if dt is not None:
            model = model.to(dt)
        engine = TorchEngine(model, family, threads=threads, static=static,
                             max_len=len(prompt.encode()) + max_new_tokens + 8)
        tok_dir = src / "tokenizer" if (src / "tokenizer").is_dir() else None
        eos = model.config.eos_token_id
    if budget:
        engine.set_budget(budget)
    tok = load_tokenizer(tok_dir)
    ids = torch.tensor([tok.encode(prompt, add_bos=True)])
    click.echo(prompt, nl=False)
    new: list[int] = []
    shown = [""]
    times = [time.perf_counter()]

    def show(step, nxt):
        times.append(time.perf_counter())
        new.append(int(nxt[0]))
        text = tok.decode(new)
        click.echo(text[len(shown[0]):], nl=False)
        shown[0] = text

    stats: dict = {}
    if draft:
        from engines.speculative import speculative_generate

        speculative_generate(engine, ids, max_new_tokens, draft=draft, verify=budget or None,
                             draft_len=draft_len if draft_len == "auto" else int(draft_len), eos_token_id=eos,
                             callback=show, temperature=temperature, stats=stats)
    elif reason_budget:
        from engines.schedule import Phase, scheduled_generate

        first = Phase(reason_budget, max_tokens=int(switch_at)) if switch_at.isdigit() else \
            Phase(reason_budget, until=(tuple(tok.encode(switch_at)),))
        scheduled_generate(engine, ids, max_new_tokens, [first, Phase(answer_budget)], eos_token_id=eos,
                           callback=show, temperature=temperature, stats=stats)
    else:
        engine.generate(ids, max_new_tokens, temperature=temperature, eos_token_id=eos, callback=show)
    n = len(new)
    first = times[1] - times[0] if n else 0.0
    start = 2 if static and n > 2 else 1  # a static step compiles on its first call: time it apart
    rate = (n - start) / (times[-1] - times[start]) if n > start else 0.0
    click.echo("")
    compiled = f", first decode step (compilation) {times[2] - times[1]:.1f} s" if start == 2 else ""
    click.echo(f"[{engine.budget}] {n} tokens: prefill {len(ids[0])} tokens in {first * 1e3:.1f} ms, "
               f"decode {rate:.1f} tokens/s{compiled}", err=True)
    if draft:
        click.echo(f"[draft {draft}] acceptance {stats['acceptance']:.2f} over {stats['rounds']} verifications, "
                   f"{stats['emitted'] / max(1, stats['rounds']):.2f} tokens each", err=True)
    for sw in stats.get("switches", []):
        click.echo(f"[switch -> {sw['to']}] after {sw['after'][0]} tokens: re-prefilled {sw['tokens']} "
                   f"tokens in {sw['seconds'] * 1e3:.1f} ms", err=True)



# ---- validation: validate, plan-memory ---------------------------------------------------------

def _csv(values) -> list[str]:
    """Repeatable options that also accept comma-separated lists."""
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


@main.command()
@click.argument("source", required=False)
@click.option("--report", "report_dir", required=True, help="Directory for report.json, report.md and the plots.")
@click.option("--backends", multiple=True, help="Backends to compare (comma-separated or repeated): torch, sliced, "
              "torch-engine, ort-standard, ort-decomposed, trt [every one available here].")
@click.option("--budget", "budgets", multiple=True, help="Budgets to validate [all].")
@click.option("--build", "builds", multiple=True, help="A further build directory (ONNX or TensorRT) of the same "
              "nested checkpoint whose engine joins the comparison, or a quantized nested checkpoint of it "
              "(elastic-export quantize: its torch engine, torch-<format>) (repeatable).")
@click.option("--device", default=None, help="Device profile for the memory plan (e.g. agx-orin-64gb, custom:24) "
              "[all built-in profiles].")
@click.option("--context", default=8192, show_default=True, help="Context length for the memory plan.")
@click.option("--batch", default=1, show_default=True, help="Batch size for the memory plan.")
@click.option("--threshold", "thresholds", multiple=True,
              help="Override a threshold: [fp32.|bf16.]METRIC=VALUE, e.g. bf16.max_abs_logit=1.0 (repeatable).")
@click.option("--tasks", "n_tasks", default=8, show_default=True, help="Synthetic tasks for exact-match accuracy "
              "(each is generated greedily to its full worked answer: the largest cost; 0 skips them).")
@click.option("--greedy-tokens", default=16, show_default=True, help="Tokens of greedy generation to compare.")
@click.option("--prompts", "n_prompts", default=4, show_default=True, help="Prompts for greedy agreement.")
@click.option("--rows", "n_rows", default=4, show_default=True, help="Held-out rows for logit errors and perplexity.")
@click.option("--seq-len", default=64, show_default=True, help="Tokens per held-out row.")
@click.option("--decode-steps", default=8, show_default=True, help="Teacher-forced decode steps compared per row.")
@click.option("--memory/--no-memory", "measure_memory", default=True, show_default=True,
              help="Measure peak memory in fresh processes (family vs separate models).")
@click.option("--memory-isolation", type=click.Choice(["fork", "spawn"]), default=None,
              help="Measure each process forked from one interpreter, or spawn a fresh interpreter each "
              "[fork on a Linux CPU].")
@click.option("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime [1 for a model "
              "under 20M parameters, whose tiny ops gain nothing from more; else the runtimes' default].")
@click.option("--ort-weights", type=click.Choice(["stored", "float32"]), default="stored", show_default=True,
              help="ONNX Runtime over a bf16 build (float32 arithmetic on a CPU): keep the weights bf16 and cast "
              "them per call (one copy at the stored size; slower), or upcast them once (twice the bytes; "
              "faster). The logits are the same.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@user_errors
def validate(source, report_dir, backends, budgets, builds, device, context, batch, thresholds, n_tasks, greedy_tokens,
             n_prompts, n_rows, seq_len, decode_steps, measure_memory, memory_isolation, threads, ort_weights, quiet):
    """Accuracy and memory parity of every budget across backends; writes a report; exit 1 on a failed check.

    SOURCE is a nested checkpoint, a build directory or an HF checkpoint [the shipped default model].
    """
    from validation.planner import device_profile
    from validation.thresholds import parse_overrides
    from validation.validate import load_family, validate as run_validation

    overrides = parse_overrides(thresholds)
    if device is not None:
        device_profile(device)
    if min(context, batch, greedy_tokens, n_prompts, n_rows, decode_steps) <= 0 or n_tasks < 0 or seq_len < 3 or \
            (threads is not None and threads <= 0):
        from .errors import ConfigError

        raise ConfigError("--context, --batch, --greedy-tokens, --prompts, --rows, --decode-steps and --threads must "
                          "be positive, --tasks not negative, --seq-len at least 3", field="options")
    family = load_family(source, builds)
    family.ort_upcast = ort_weights == "float32"
    report = run_validation(family, report_dir, _csv(backends) or None, device, context, batch, overrides,
                            measure_memory, list(budgets) or None, progress=not quiet,
                            eval_kwargs={"n_tasks": n_tasks, "greedy_tokens": greedy_tokens, "n_prompts": n_prompts,
                                         "n_rows": n_rows, "seq_len": seq_len, "decode_steps": decode_steps},
                            memory_isolation=memory_isolation, threads=threads, release=True)
    for r in report["parity"]:
        m = r["metrics"]
        err = f"max|dlogit| {m['abs_logit']:.2e}  top1 {m['top1']:.4f}  greedy {m['greedy']:.3f}" if m else ""
        click.echo(f"{r['backend']:<15} {r['budget']:<10} {r['precision']:<5} {err}  "
                   f"{'pass' if r['passed'] else 'FAIL ' + '; '.join(r['failed'])}")
    if report["skipped_backends"]:
        click.echo("skipped: " + ", ".join(f"{k} ({v})" for k, v in report["skipped_backends"].items()))
    mem = report.get("memory") or {}
    if "peak" in mem:
        p = mem["peak"]
        click.echo(f"memory: one process serving all budgets {p['family'] / 1e6:.1f} MB peak, separate processes "
                   f"{p['separate_sum'] / 1e6:.1f} MB in total ({p['family_net'] / 1e6:.1f} vs "
                   f"{p['separate_net'] / 1e6:.1f} MB net of the {p['baseline'] / 1e6:.0f} MB baseline)")
    click.echo(f"{'PASSED' if report['passed'] else 'FAILED'}: report in {report_dir}")
    if not report["passed"]:
        sys.exit(1)


@main.command(name="plan-memory")
@click.argument("source", required=False)
@click.option("--preset", help="A built-in config instead of SOURCE (e.g. nemotron-nano-v2-12b).")
@click.option("--budget", "budgets", multiple=True,
              help="Budgets to plan when SOURCE has none (75%, 9B, NAME=SPEC; repeatable) [75%, 50%].")
@click.option("--device", "devices", multiple=True, help="Device profile(s): a name, 'edge', 'all' or custom:GB "
              "(comma-separated or repeated) [all].")
@click.option("--context", "contexts", multiple=True, type=int, help="Context length(s) [8192].")
@click.option("--batch", default=1, show_default=True)
@click.option("--dtype", "dtypes", multiple=True, help="Weight dtype(s): bfloat16, float32, float16, or quantized "
              "int8, int4, fp8 (codes + scales; KV, state, activations at bfloat16) [bfloat16].")
@click.option("--prefill-chunk", type=int, default=None, help="Plan activations for a chunked prefill of this size.")
@click.option("--json", "json_out", default=None, help="Also write the plan as JSON.")
@click.option("--plot", default=None, help="Also draw the plan as a PNG (family vs separate, totals vs devices).")
@click.option("--recipe", default=None, help="Plan the training of this recipe instead: per-GPU memory of each "
              "stage for DDP and FSDP2 (--preset overrides the recipe's model).")
@click.option("--gpus", "gpus", multiple=True, type=int, help="GPU counts for --recipe (repeatable) [those of 1, 2, 4, 8 that divide every stage's batch].")
@click.option("--teacher-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="The frozen teacher's dtype for --recipe (the trainer holds it in float32).")
@user_errors
def plan_memory(source, preset, budgets, devices, contexts, batch, dtypes, prefill_chunk, json_out, plot, recipe, gpus,
                teacher_dtype):
    """Which budgets fit a device at a context length and batch (weights, KV, conv + SSM state, activations);
    with --recipe, the per-GPU memory of training that recipe (weights, grads, AdamW, teacher, activations)."""
    import json

    if recipe is not None:
        return _plan_training_memory(recipe, source, preset, gpus, teacher_dtype, json_out)
    from validation.planner import EDGE, PROFILES, deployment_comparison, device_profile, plan, plan_text

    from .errors import ConfigError
    from .hf_io import atomic_write_text, parse_dtype

    names = _csv(devices) or ["all"]
    devs = []
    for n in names:
        devs += list(PROFILES) if n == "all" else EDGE if n == "edge" else [device_profile(n).name
                                                                             if n in PROFILES else n]
    for d in devs:
        device_profile(d)
    from .accounting import QUANT_DTYPES

    dtypes = _csv(dtypes) or ["bfloat16"]
    for d in dtypes:
        if d not in QUANT_DTYPES:
            parse_dtype(d)
    contexts = list(contexts) or [8192]
    if any(c <= 0 for c in contexts) or batch <= 0:
        raise ConfigError("--context and --batch must be positive", field="--context/--batch")
    cfg, chosen = _plan_memory_budgets(source, preset, budgets)
    from .qcheckpoint import family_quant_plans

    qplans = family_quant_plans(source, cfg, chosen, [d for d in dtypes if d in QUANT_DTYPES])
    out = {"comparison": deployment_comparison(cfg, chosen, dtypes[0], quant_plan=qplans.get(dtypes[0])),
           "plans": []}
    for ctx in contexts:
        p = plan(cfg, chosen, devs, ctx, batch, tuple(dtypes), prefill_chunk, qplans)
        out["plans"].append(p)
        click.echo(plan_text(p, out["comparison"] if ctx == contexts[0] else None))
        click.echo("")
    if len(contexts) > 1:
        click.echo(f"budgets that fit ({dtypes[0]}, batch {batch}):")
        click.echo(f"  {'device':<24}" + "".join(f"{'context ' + str(c):>22}" for c in contexts))
        for i, d in enumerate(out["plans"][0]["devices"]):
            fits = [", ".join(p["devices"][i]["dtypes"][dtypes[0]]["fits"]) or "none" for p in out["plans"]]
            click.echo(f"  {d['profile']['label']:<24}" + "".join(f"{f:>22}" for f in fits))
    if json_out:
        atomic_write_text(json_out, json.dumps(out, indent=2) + "\n")
    if plot:
        from validation.report import plot_deployment

        plot_deployment(out["comparison"], out["plans"], plot)


def _plan_training_memory(recipe_path, source, preset, gpus, teacher_dtype, json_out):
    import json

    from training.recipe import load_recipe, parent_config
    from validation.train_memory import plan_training, training_plan_text

    from .accounting import count_params
    from .errors import ConfigError
    from .hf_io import atomic_write_text
    from .inspect import make_preset

    if source is not None:
        raise ConfigError("give --recipe without SOURCE (the recipe names the model; --preset overrides it)",
                          field="SOURCE")
    if any(n <= 0 for n in gpus):
        raise ConfigError(f"must be positive, got {list(gpus)}", field="--gpus")
    r = load_recipe(recipe_path)
    # default: those of 1, 2, 4, 8 GPUs that divide every stage's batch (as the trainer requires)
    gpus = list(gpus) or [n for n in (1, 2, 4, 8) if all(s["batch_size"] % n == 0 for s in r["stages"])]
    cfg = make_preset(preset) if preset else parent_config(r, recipe_path)
    rows = plan_training(cfg, r, gpus, teacher_bytes=4 if teacher_dtype == "float32" else 2)
    click.echo(f"recipe {recipe_path}" + (f" on preset {preset}" if preset else ""))
    click.echo(training_plan_text(rows, params=count_params(cfg)))
    if json_out:
        atomic_write_text(json_out, json.dumps({"recipe": str(recipe_path), "preset": preset, "rows": rows},
                                               indent=2) + "\n")


def _plan_memory_budgets(source, preset, budgets):
    """(config, {name: Subnet}) from a nested checkpoint's manifest, or by search on a config/preset."""
    from .errors import ConfigError
    from .inspect import resolve_config
    from .nested import is_nested, read_importance, read_manifest
    from .search import plan_budgets

    if source is not None and preset is not None:
        raise ConfigError("give SOURCE or --preset, not both", field="--preset")
    if source is not None and is_nested(source):
        _, cfg, chosen = read_manifest(source)
        if budgets:
            chosen = {**chosen, **plan_budgets(cfg, list(budgets), importance=read_importance(source, cfg))}
        return cfg, chosen
    cfg = resolve_config(source, preset)
    if cfg.has_moe and not budgets:  # no budget search over experts yet: plan the model itself
        from .elastic import full_subnet

        return cfg, {"full": full_subnet(cfg)}
    return cfg, plan_budgets(cfg, list(budgets) or ["75%", "50%"])



if __name__ == "__main__":
    main()
