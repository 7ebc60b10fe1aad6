"""One load for every checkpoint the toolkit writes (``elastic_export.load``).

What a directory is, is read from the file that describes it, never guessed from its name:

    elastic.json   a nested checkpoint (written by ``rank``, ``nest``, ``train``): one weight copy, budgets
    config.json    an HF ``nemotron_h`` checkpoint (sharded or not), including our slices: a homogeneous
                   budget, a heterogeneous one in the padded layout (a plain config: any reader) and
                   in the compact layout (per-layer widths in config.json: ours only)
    build.json     a build directory: it holds graphs, not a torch model; load the checkpoint it names
"""

from __future__ import annotations

from pathlib import Path

from .elastic import full_subnet
from .errors import BudgetError, CheckpointError

FULL = "full"  # the one budget of a plain checkpoint: the model itself


def kind(path: str | Path) -> str:
    """``nested``, ``hf`` or ``build`` for a checkpoint or build directory; CheckpointError otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("does not exist", path=path, fix="give the path of a checkpoint directory")
    if path.is_file() and path.name == "config.json":
        return "hf"
    if (path / "elastic.json").is_file():
        return "nested"
    if (path / "config.json").is_file():
        return "hf"
    if (path / "build.json").is_file():
        return "build"
    raise CheckpointError("is not a checkpoint: config.json is missing (an HF checkpoint has one), and so is "
                          "elastic.json (a nested one)", path=path,
                          fix="give a directory with config.json and *.safetensors, or one written by elastic-export")


def load_family(path: str | Path, dtype=None, device="cpu", writable: bool = True) -> tuple:
    """(model, budgets name -> Subnet largest first, checkpoint dir) of any checkpoint we read.

    A nested checkpoint gives its sorted parent and every budget of its manifest (files verified
    against their SHA-256); a plain HF checkpoint, or one of our slices, is a one-budget family
    ``{"full": the model itself}``. The one place ``build``, ``run`` and ``load`` open a family.

    ``writable=False``: the files are mapped read-only, for callers that never write the weights; the
    model then carries ``drop_source_pages()``, which hands the pages read so far back to the page
    cache (a caller that has finished with a tensor calls it; what is read again faults back in)."""
    path = Path(path)
    k = kind(path)
    from .qcheckpoint import is_quantized_hf, is_quantized_nested, load_quantized

    if is_quantized_nested(path) or is_quantized_hf(path):
        model = load_quantized(path)
        return (model if dtype is None else model.to(dtype)), dict(model.budgets), Path(model.source)
    if k == "build":
        raise CheckpointError("is a build directory, not a checkpoint", path=path,
                              fix="give the checkpoint it was built from (build.json: source), or `run` it")
    if k == "nested":
        from .nested import load_nested

        ck = load_nested(path, dtype=dtype, device=device, writable=writable)
        if not writable:
            ck.model.drop_source_pages = ck.drop_pages
        return ck.model, dict(ck.budgets), Path(ck.path)
    from .hf_io import checkpoint_dir, model_from, open_checkpoint

    cfg, reader = open_checkpoint(path, writable)
    model = model_from(cfg, reader, dtype, device)
    if not writable:
        model.drop_source_pages = reader.drop_pages
    return model, {FULL: full_subnet(model.config)}, checkpoint_dir(path)


def load(path: str | Path, budget: str | None = None, dtype=None, device="cpu"):
    """Open any checkpoint the toolkit writes, as a :class:`NemotronHForCausalLM`.

    - an HF ``nemotron_h`` directory (``config.json`` + ``*.safetensors``, sharded or not), or a slice
      we wrote (homogeneous, padded, or compact with per-layer widths): that model;
    - a nested checkpoint (``elastic.json``, the output of ``rank``, ``nest`` and ``train``): the
      elastic model, i.e. the full importance-sorted weights, which runs any of its budgets through
      views of that one copy: ``model(ids, subnet=model.budgets["50pct"])``,
      ``model.generate(ids, 16, subnet=model.budgets["50pct"])``.

    Every model returned carries ``model.budgets`` (name -> Subnet, largest first; a plain
    checkpoint has the one budget ``"full"``). ``budget="50pct"`` returns that budget instead, as a
    standalone model with its own (sliced) weights and the same logits as the elastic forward; its
    ``budgets`` is ``{"full": ...}``. ``dtype`` converts floating weights (default: as stored).

        model = elastic_export.load("nested/")                    # elastic: every budget, one copy
        small = elastic_export.load("nested/", budget="50pct")   # one budget, standalone
        hf = elastic_export.load("slices/50pct")                 # an HF checkpoint or a slice
    """
    from .qcheckpoint import is_quantized_hf, is_quantized_nested, load_quantized

    if is_quantized_nested(path) or is_quantized_hf(path):  # codes + scales: dequantized a layer at a time
        model = load_quantized(path, budget)
        return (model if dtype is None else model.to(dtype)).eval()
    model, budgets, _ = load_family(path, dtype=dtype, device=device)
    if budget is not None and budget != FULL:
        if budget not in budgets:
            raise BudgetError(f"unknown budget {budget!r}", path=path, field="budget",
                              fix=f"use one of {', '.join(budgets)}")
        from .slicing import slice_budget

        model = slice_budget(model, budgets[budget])
        budgets = {FULL: full_subnet(model.config)}
    elif budget == FULL and model.config.head_order != "group_contiguous":
        from .slicing import slice_budget

        model = slice_budget(model, budgets[FULL])  # standalone, in the order HF readers expect
        budgets = {FULL: full_subnet(model.config)}
    model.budgets = budgets
    return model.eval()

