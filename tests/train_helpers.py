"""Tiny recipes for the training tests (a 4-layer hybrid, hidden 32, a few steps)."""

from __future__ import annotations

import copy
from pathlib import Path

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 60


def tiny_recipe(tmp: Path, **overrides) -> dict:
    text = tmp / "corpus.txt"
    if not text.exists():
        text.write_text(TEXT)
    r = {
        "name": "tiny", "seed": 0, "out": str(tmp / "run"),
        "model": {"init": "scratch", "config": {
            "vocab_size": 259, "hidden_size": 32, "pattern": "M-*-", "mamba_num_heads": 4, "mamba_head_dim": 8,
            "n_groups": 2, "ssm_state_size": 8, "chunk_size": 16, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64}},
        "data": {"sources": [{"kind": "text", "path": str(text), "weight": 0.7},
                             {"kind": "tasks", "count": 200, "weight": 0.3}],
                 "held_out": 0.0, "eval_windows": 2, "eval_tasks": 4},
        "budgets": {"names": ["full", "75pct", "50pct"], "fractions": [1.0, 0.75, 0.5]},
        "router": {"hidden": 16, "width_choices": [0.5, 0.75, 1.0], "warmup_steps": 2},
        "stages": [
            {"name": "pretrain", "kind": "pretrain", "tokens": 4 * 4 * 32, "seq_len": 32, "batch_size": 4,
             "lr": 3e-3, "warmup_steps": 2},
            {"name": "stage1", "kind": "elastic", "tokens": 3 * 4 * 32, "seq_len": 32, "batch_size": 4,
             "lr": 1e-3, "warmup_steps": 2},
            {"name": "stage2", "kind": "elastic", "tokens": 3 * 4 * 48, "seq_len": 48, "batch_size": 4,
             "lr": 1e-3, "warmup_steps": 2, "sampling": "weighted", "weights": [0.5, 0.3, 0.2]},
        ],
        "train": {"checkpoint_every": 2, "log_every": 1, "progress": False, "threads": 1},
    }
    r = copy.deepcopy(r)
    for key, value in overrides.items():  # "train.grad_accum": 2 style
        node = r
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[parts[-1]] = value
    return r


def to_toml(r: dict) -> str:
    """Minimal TOML writer for the recipes above (tables, arrays of tables, scalars, lists)."""
    import json

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    lines = []

    def table(prefix, d, header=None):
        if header:
            lines.append(header)
        for k, v in d.items():
            if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict)):
                lines.append(f"{k} = {val(v)}")
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                table(name + ".", v, f"[{name}]")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    table(name + ".", item, f"[[{name}]]")

    table("", r)
    return "\n".join(lines) + "\n"


def torchrun_train(r: dict, tmp: Path, port: int, timeout: int = 180) -> Path:
    """Train recipe ``r`` with ``elastic-export train`` on 2 CPU processes (torchrun, gloo) into tmp/ddp;
    returns the recipe file it wrote (tmp/r.toml)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    f = tmp / "r.toml"
    f.write_text(to_toml(r))
    env = {**os.environ, "PYTHONPATH": f"{root}:{root / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "elastic_export.cli", "train", str(f), "--out", str(tmp / "ddp"), "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return f
