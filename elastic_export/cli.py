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
    from .inspect import inspect_text, resolve_config

    click.echo(inspect_text(resolve_config(path, preset)))


# ---- elastic core: rank, plan, nest, slice -----------------------------------------------------


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
