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
    """Layer table, parameter counts and sizes of a checkpoint or a config.json (no weights needed)."""
    from .inspect import inspect_text, resolve_config, weights_summary

    cfg = resolve_config(path, preset)
    click.echo(inspect_text(cfg, weights_summary(None if preset else path, cfg)))


# ---- elastic core: rank, plan, nest, slice -----------------------------------------------------

def _load_parent(path: str, dtype=None):
    """(model, importance or None, tokenizer dir or None) from a nested or an HF checkpoint."""
    from pathlib import Path

    from .hf_io import load
    from .nested import is_nested, load_nested

    if is_nested(path):
        ck = load_nested(path, dtype=dtype)
        return ck.model, ck.importance, ck.tokenizer_path
    tok = Path(path) / "tokenizer"
    return load(path, dtype=dtype), None, tok if tok.is_dir() else None


_search_options = [
    click.option("--budget", "budgets", multiple=True, required=True,
                 help="75%, 9B, 300M, NAME=SPEC or [NAME=]subnet.json (repeatable)."),
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
@click.argument("parent")
@click.option("--calib", multiple=True, required=True, help="Token files (.npy/.bin/.txt ids) or text files.")
@click.option("--out", required=True, help="Output: a nested checkpoint with the sorted weights and scores.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per calibration window.")
@click.option("--samples", default=64, show_default=True, help="Calibration windows at most.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--depth", "depth_mode", type=click.Choice(["oneshot", "iterative", "none"]), default="oneshot",
              show_default=True, help="Depth ranking by normalized logit MSE (Eq. 5).")
@click.option("--head-channels", type=int, default=None, help="Top channels scoring Mamba heads (Eq. 4) [all].")
@click.option("--tokenizer", default=None, help="Tokenizer for text files [the parent's, else byte-level].")
@click.option("--dtype", default=None, help="Compute and save dtype [as stored].")
@user_errors
def rank(parent, calib, out, seq_len, samples, batch_size, depth_mode, head_channels, tokenizer, dtype):
    """Rank every elastic axis on calibration data and sort the parent's weights (nested order)."""
    import time

    from .importance import compute_importance, load_calibration
    from .nested import save_nested
    from .sorting import sort_model
    from .tokenizer import load_tokenizer

    model, _, tok_dir = _load_parent(parent, dtype)
    tok = load_tokenizer(tokenizer or tok_dir)
    ids = load_calibration(calib, model.config.vocab_size, seq_len, samples, tok)
    t0 = time.perf_counter()
    imp = compute_importance(model.eval(), ids, batch_size, depth_mode, head_channels)
    sorted_model, sorted_imp = sort_model(model, imp)
    save_nested(out, sorted_model, {}, importance=sorted_imp, tokenizer=tokenizer or tok_dir)
    click.echo(f"ranked on {ids.shape[0]} x {ids.shape[1]} tokens in {time.perf_counter() - t0:.1f} s")
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
@click.argument("parent_sorted")
@search_options
@click.option("--out", required=True, help="Output nested checkpoint directory.")
@click.option("--dtype", default=None, help="Save dtype [as stored].")
@user_errors
def nest(parent_sorted, budgets, mode, divisor, depth, out, dtype):
    """A nested checkpoint from a sorted parent with budgets chosen by the pruning baseline (no training)."""
    from .nested import check_budgets, save_nested
    from .search import plan_text

    model, importance, tok_dir = _load_parent(parent_sorted)
    chosen = _plan(model.config, importance, budgets, mode, divisor, depth)
    check_budgets(model.config, chosen)  # refuse before warning or writing
    if importance is None:
        click.echo("warning: the parent carries no importance scores (run `elastic-export rank` first); "
                   "budgets are prefixes of the weights as stored", err=True)
    save_nested(out, model, chosen, importance=importance, tokenizer=tok_dir, dtype=dtype)
    click.echo(plan_text(model.config, chosen))
    click.echo(f"wrote {out}")


@main.command(name="slice")
@click.argument("nested")
@click.option("--budget", "budget", required=True, help="A budget name from the manifest, or 'all'.")
@click.option("--out", required=True, help="Output checkpoint directory (with 'all': one subdirectory per budget).")
@click.option("--dtype", default=None, help="Save dtype [as stored].")
@user_errors
def slice_cmd(nested, budget, out, dtype):
    """Standalone checkpoints of nested budgets (HF nemotron_h when homogeneous)."""
    import shutil

    from .hf_io import atomic_dir, parse_dtype, save_pretrained
    from .nested import load_nested

    dt = parse_dtype(dtype)
    ck = load_nested(nested)
    names = list(ck.budgets) if budget == "all" else [budget]
    subnets = {n: ck.subnet(n) for n in names}  # unknown names fail here, before any write
    with atomic_dir(out) as tmp:
        for n, s in subnets.items():
            target = tmp / n if budget == "all" else tmp
            sl = ck.slice(n)
            save_pretrained(sl, target, dtype=dt)
            if ck.tokenizer_path is not None:
                shutil.copytree(ck.tokenizer_path, target / "tokenizer")
            kind = "heterogeneous (elastic_export.load)" if sl.config.layer_widths else "HF nemotron_h"
            click.echo(f"{n}: {sl.num_parameters():,} parameters, {kind} -> {out}{'/' + n if budget == 'all' else ''}")



# ---- training: train ---------------------------------------------------------------------------

@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", help="Run directory (checkpoints, metrics.jsonl); default: the recipe's `out`.")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming from OUT/checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs still go to metrics.jsonl).")
@user_errors
def train(recipe, out, fresh, no_progress):
    """Train a recipe: pretrain a parent and/or elastify it; writes a nested checkpoint.

    Runs on N processes unchanged: torchrun --nproc-per-node N -m elastic_export.cli train RECIPE
    """
    from training.recipe import load_recipe
    from training.trainer import train as run_training

    path = run_training(load_recipe(recipe), out=out, resume=not fresh, progress=False if no_progress else None)
    if path is not None:
        click.echo(f"nested checkpoint: {path}")



# ---- build and run: build, run -----------------------------------------------------------------


# ---- validation: validate, plan-memory ---------------------------------------------------------


if __name__ == "__main__":
    main()
