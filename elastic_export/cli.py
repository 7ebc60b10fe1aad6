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


# ---- build and run: build, run -----------------------------------------------------------------

@main.command()
@click.argument("nested", required=False)
@click.option("--budget", "budgets", multiple=True, default=("all",), show_default=True,
              help="Budget name(s) to build, or 'all'.")
@click.option("--target", type=click.Choice(["onnx", "trt", "auto"]), default="auto", show_default=True,
              help="auto: TensorRT where TensorRT and a CUDA GPU are present, else ONNX.")
@click.option("--ssm-op", type=click.Choice(["standard", "decomposed", "plugin"]), default="standard",
              show_default=True, help="How the SSM scan is expressed in ONNX.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the lowest the SSM op allows).")
@click.option("--out", required=True, type=click.Path(), help="Build directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@user_errors
def build(nested, budgets, target, ssm_op, dtype, opset, out, overwrite):
    """Build ONNX graphs (or TensorRT engines) for budgets of a nested checkpoint (default: the shipped model)."""
    import time

    from .build import build as run_build, read_build

    t0 = time.perf_counter()
    path = run_build(nested, out, budgets=budgets, target=target, ssm_op=ssm_op, dtype=dtype, opset=opset,
                     overwrite=overwrite, progress=lambda msg: click.echo(msg, err=True))
    m = read_build(path)
    size = sum(f["bytes"] for f in m.get("files", {}).values())
    click.echo(f"built {', '.join(m['budgets'])} ({m['target']}, {m.get('ssm_op')}, {m.get('dtype')}) into {path}: "
               f"{size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")


@main.command()
@click.argument("path")
@click.option("--budget", help="Budget to run (default: the largest).")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 100000))
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--threads", default=None, type=int, help="CPU threads (default: the runtime's choice).")
@user_errors
def run(path, budget, prompt, max_new_tokens, temperature, threads):
    """Generate text from a build directory (ONNX Runtime) or a nested checkpoint (torch)."""
    import time
    from pathlib import Path

    import torch

    from .tokenizer import load_tokenizer

    p = Path(path)
    if (p / "build.json").is_file():
        from .build import read_build

        m = read_build(p)
        if m["target"] != "onnx":
            from .errors import ConfigError
            raise ConfigError(f"runs ONNX builds only; this one is {m['target']!r}", path=p / "build.json",
                              field="target", fix="use the engines.trt runner for TensorRT builds")
        from engines.ort_engine import OrtEngine

        engine = OrtEngine(p, budgets=[budget] if budget else None, threads=threads)
        tok_dir = p / m["tokenizer"] if m.get("tokenizer") else None
        eos = m["config"].get("eos_token_id")
    else:
        from engines.torch_engine import TorchEngine

        from .build import load_family

        model, family, src = load_family(p)
        engine = TorchEngine(model, family, threads=threads)
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

    engine.generate(ids, max_new_tokens, temperature=temperature, eos_token_id=eos, callback=show)
    n = len(new)
    first = times[1] - times[0] if n else 0.0
    rate = (n - 1) / (times[-1] - times[1]) if n > 1 else 0.0
    click.echo("")
    click.echo(f"[{engine.budget}] {n} tokens: prefill {len(ids[0])} tokens in {first * 1e3:.1f} ms, "
               f"decode {rate:.1f} tokens/s", err=True)



# ---- validation: validate, plan-memory ---------------------------------------------------------


if __name__ == "__main__":
    main()
