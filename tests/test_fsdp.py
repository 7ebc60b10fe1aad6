"""FSDP2 training (train.parallel = "fsdp2") on CPU, gloo, against the 1-process trainer.

One torchrun launch of 2 processes (tests/fsdp_worker.py) trains, in turn: the recipe uninterrupted, then
the recipe with activation checkpointing stopped after step 9 (as if killed; its last checkpoint is step
8's) and resumed. Both must end with the same parameters bit for bit (checkpointing recomputes the same
activations; resuming replays the same steps), as the 1-process checks show each alone. The recipe routes every elastic step through the router, and
its second elastic stage trains every budget per step (sandwich: several forwards of each FSDP2 unit
before one backward) with gradient accumulation (2 micro-batches per rank). The reference is the
plain 1-process trainer on the same global batch (the DDP path with one process, no wrapper at all).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import elastic_export as ee
from elastic_export.cli import main
from elastic_export.errors import ConfigError
from test_trainer import layout, losses
from train_helpers import tiny_recipe, to_toml
from training.recipe import parent_config, validate_recipe
from training.trainer import train
from validation.train_memory import stage_memory

ROOT = Path(__file__).resolve().parents[1]
STOP = 9


def fsdp_recipe(tmp: Path, **overrides) -> dict:
    stages = tiny_recipe(tmp)["stages"]
    stages[2] = {**stages[2], "sampling": "sandwich"}
    return tiny_recipe(tmp, **{"stages": stages, "train.grad_accum": 2, "train.parallel": "fsdp2", **overrides})


def budgets(run: Path) -> dict[int, str]:
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["budget"] for r in recs if "loss" in r}


def params(nested: Path) -> dict[str, torch.Tensor]:
    return load_file(str(nested / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    recipes = {name: tmp / f"{name}.toml" for name in ("fsdp", "ac")}
    recipes["fsdp"].write_text(to_toml(fsdp_recipe(tmp)))
    recipes["ac"].write_text(to_toml(fsdp_recipe(tmp, **{"train.activation_checkpointing": True})))
    f = recipes["fsdp"]
    ac = recipes["ac"]
    args = [f"{f}@{tmp / 'f2'}", f"{ac}@{tmp / 'k2'}:{STOP}", f"{ac}@{tmp / 'k2'}"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    # --standalone: a free port (two suites at once must not meet); its own session, so that a timeout
    # kills the workers too (a rank left waiting on gloo for its dead peer would outlive the test)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "fsdp_worker.py"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the 2-process run did not finish in 300 s: {stderr[-4000:]}")
    p = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert p.returncode == 0, p.stderr[-4000:]
    single = train(validate_recipe(fsdp_recipe(tmp, **{"train.parallel": "ddp"})), out=tmp / "single")
    return tmp, single, p.stdout


def test_two_process_fsdp2_equals_one_process(runs):
    tmp, single, _ = runs
    a, b = losses(tmp / "f2"), losses(tmp / "single")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert budgets(tmp / "f2") == budgets(tmp / "single")  # the same draws on every rank as on one process
    assert all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)
    d = max_diff(params(tmp / "f2" / "nested"), params(single))
    assert d < 1e-5, d
    print(f"2-process FSDP2 vs 1 process after 10 steps: max |param diff| {d:.2e}")


def test_resume_after_a_kill_equals_the_uninterrupted_run(runs):
    """(with activation checkpointing under FSDP2 on 2 processes: k2's recipe has it)"""
    tmp, _, stdout = runs
    assert f"k2/checkpoint at step {STOP - 1}/10" in stdout  # the killed run's last checkpoint, resumed
    a, b = losses(tmp / "f2"), losses(tmp / "k2")
    assert a == b
    d = max_diff(params(tmp / "f2" / "nested"), params(tmp / "k2" / "nested"))
    assert d == 0.0, d
    ck = tmp / "k2" / "checkpoint"
    files = sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file())
    assert files == ["sharded/shard-00001-model-00001-of-00001.safetensors",
                     "sharded/shard-00002-model-00001-of-00001.safetensors", "state.json", "state.safetensors"]
    state = json.loads((ck / "state.json").read_text())
    assert state["parallel"] == "fsdp2" and state["world"] == 2 and state["step"] == 10


def test_sharded_checkpoint_loads_on_another_process_count(runs, tmp_path):
    """k2's last checkpoint (2 processes, step 10) resumed by 1 process: DCP reshards model, router, moments
    and teacher; nothing is left to train, so the nested checkpoint is f2's to the bit."""
    import shutil

    tmp, _, _ = runs
    shutil.copytree(tmp / "k2" / "checkpoint", tmp_path / "one" / "checkpoint")
    shutil.copytree(tmp / "k2" / "teacher", tmp_path / "one" / "teacher")
    shutil.copy(tmp / "k2" / "metrics.jsonl", tmp_path / "one" / "metrics.jsonl")
    nested = train(validate_recipe(fsdp_recipe(tmp)), out=tmp_path / "one")
    assert max_diff(params(tmp / "f2" / "nested"), params(nested)) == 0.0


def test_nested_checkpoint_has_the_one_process_format(runs):
    tmp, single, _ = runs
    assert layout(tmp / "f2" / "nested") == layout(single)
    model = ee.load(tmp / "f2" / "nested")
    assert list(model.budgets) == ["full", "75pct", "50pct"]
    ref = ee.load(single)
    assert model.budgets == ref.budgets
    x = torch.randint(3, 200, (1, 16))
    for sub in model.budgets.values():
        assert (model(x, subnet=sub) - ref(x, subnet=sub)).abs().max() < 1e-3


def test_activation_checkpointing_changes_nothing(tmp_path):
    r = tiny_recipe(tmp_path, **{"stages": tiny_recipe(tmp_path)["stages"][:2]})
    plain = train(validate_recipe(r), out=tmp_path / "plain")
    for parallel in ("ddp", "fsdp2"):  # 1 process: plain, and FSDP2 over a group of one
        over = {"train.activation_checkpointing": True, "train.parallel": parallel}
        ac = train(validate_recipe(tiny_recipe(tmp_path, **{"stages": r["stages"], **over})), out=tmp_path / parallel)
        assert max_diff(params(plain), params(ac)) == 0.0, parallel


def test_plan_memory_fsdp2_terms_equal_the_local_shards(runs):
    tmp, _, _ = runs
    r = validate_recipe(fsdp_recipe(tmp))
    cfg = parent_config(r)
    weights = list(ee.load(tmp / "f2" / "nested").parameters())
    P = sum(t.numel() for t in weights)
    row = sum(t.numel() // t.shape[0] * 4 for t in weights)  # FSDP2 splits dim 0: a rank is off by < 1 row each
    events = [json.loads(l) for l in (tmp / "f2" / "metrics.jsonl").read_text().splitlines()]
    mem = {e["stage"]: e["ranks"] for e in events if e.get("event") == "memory"}
    assert set(mem) == {"pretrain", "stage1", "stage2"}
    for stage in ("pretrain", "stage2"):  # (stage1's first step is the full budget against its own copy: skipped)
        m = stage_memory(cfg, r, next(s for s in r["stages"] if s["name"] == stage), 2, "fsdp2", device="cpu")
        ranks = mem[stage]
        for k in ("weights", "grads", "optimizer", "teacher"):
            assert sum(x[k] for x in ranks) == 2 * getattr(m, k), (stage, k)  # the shards add up to the whole
            per = 2 * row if k == "optimizer" else row
            assert all(abs(x[k] - getattr(m, k)) <= per for x in ranks), (stage, k)  # each rank about half
        assert all(x["router"] == m.router for x in ranks), stage  # replicated, trained
    assert 2 * stage_memory(cfg, r, r["stages"][0], 2, "fsdp2", device="cpu").weights == 4 * P


def test_bad_parallel_field_is_refused(tmp_path):
    r = tiny_recipe(tmp_path, **{"train.parallel": "fsdp"})
    with pytest.raises(ConfigError, match="train.parallel.*ddp, fsdp2"):
        validate_recipe(r)
    f = tmp_path / "r.toml"
    f.write_text(to_toml(r))
    res = CliRunner().invoke(main, ["train", str(f), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "train.parallel" in res.output and "Traceback" not in res.output, res.output


def test_resume_with_another_strategy_is_refused(tmp_path):
    r = tiny_recipe(tmp_path, **{"stages": tiny_recipe(tmp_path)["stages"][:1]})
    assert train(validate_recipe(r), out=tmp_path / "o", stop_after_step=2) is None
    with pytest.raises(ConfigError, match="train.parallel = 'ddp'"):
        train(validate_recipe(tiny_recipe(tmp_path, **{"stages": r["stages"], "train.parallel": "fsdp2"})),
              out=tmp_path / "o")
