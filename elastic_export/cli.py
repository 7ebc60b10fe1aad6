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


# ---- training: train ---------------------------------------------------------------------------


# ---- build and run: build, run -----------------------------------------------------------------


# ---- validation: validate, plan-memory ---------------------------------------------------------


if __name__ == "__main__":
    main()
