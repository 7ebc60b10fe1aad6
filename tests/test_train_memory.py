"""plan-memory --recipe (issue 13): the training memory estimate against what the trainer holds.

The weight, gradient, AdamW, teacher and router terms are counts: they must equal the bytes of the
tensors the trainer holds after a step. The activation term is an estimate: within 0.5x-2x of the
bytes autograd saves for backward in the same step (summed with saved_tensors_hooks, parameters
and repeated storages excluded).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from elastic_export.cli import main
from tests.train_helpers import tiny_recipe, to_toml
from training.recipe import validate_recipe
from training.trainer import Trainer
from validation.train_memory import stage_memory


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _held(t: Trainer) -> dict:
    """Bytes of the tensors the trainer holds: parameters, gradients, AdamW moments, teacher, router."""
    model, router = list(t.model.parameters()), list(t.router.parameters())
    moments = lambda ps: [v for p in ps for k, v in t.opt.state.get(p, {}).items() if k != "step"]
    return {"weights": _nbytes(model), "grads": _nbytes(p.grad for p in model), "optimizer": _nbytes(moments(model)),
            "teacher": _nbytes(t.teacher.parameters()) if t.teacher is not None else 0,
            "router": _nbytes(router) + _nbytes(p.grad for p in router) + _nbytes(moments(router))}


def _saved_bytes_of_step(t: Trainer, stage) -> int:
    """Bytes autograd saves for backward during one train_step (not parameters, each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in [*t.model.parameters(), *t.router.parameters()]}
    saved: dict[int, int] = {}

    def pack(x):
        s = x.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        t.train_step(stage)
    return sum(saved.values())


@pytest.mark.parametrize("overrides", [
    {"stages.1.sampling": "sandwich"},
    {"stages.1.sampling": "sandwich", "model.config.hidden_size": 40, "model.config.intermediate_size": 72,
     "model.config.pattern": "M*-M-"},
])
def test_estimate_terms_match_the_trainer(tmp_path, overrides):
    r = validate_recipe(tiny_recipe(tmp_path, **overrides))
    (tmp_path / "run").mkdir()
    t = Trainer(r, out=tmp_path / "run", progress=False)
    pre, el = t.stages[0], t.stages[1]
    for stage in (pre, el):
        if stage.spec["kind"] == "elastic":
            t._begin_elastic()  # sort, freeze the teacher, fresh optimizer (what run() does at the elastic start)
        act = _saved_bytes_of_step(t, stage)
        m = stage_memory(t.cfg, r, stage.spec, 1, "ddp", device="cpu")
        held = _held(t)
        assert held["teacher"] == (held["weights"] if stage is el else 0)
        for k in ("weights", "grads", "optimizer", "teacher", "router"):
            assert getattr(m, k) == held[k], (stage.spec["name"], k)
        assert 0.5 <= m.activations / act <= 2.0, (stage.spec["name"], m.activations, act)
        assert m.activations_ckpt < m.activations


def test_fsdp2_shards_what_ddp_replicates(tmp_path):
    r = validate_recipe(tiny_recipe(tmp_path))
    from training.recipe import parent_config

    cfg, s = parent_config(r), r["stages"][1]
    d1, f1 = (stage_memory(cfg, r, s, 1, k) for k in ("ddp", "fsdp2"))
    assert f1.total == d1.total + f1.in_flight and f1.in_flight > 0  # FSDP2 gathers into its own buffers on 1 GPU too
    d4, f4 = (stage_memory(cfg, r, s, 4, k) for k in ("ddp", "fsdp2"))
    for k in ("weights", "grads", "optimizer", "teacher"):
        assert getattr(d4, k) == getattr(d1, k) and getattr(f4, k) == getattr(d1, k) / 4
    assert d4.activations == f4.activations == pytest.approx(d1.activations / 4, rel=0.3)
    assert f4.in_flight > 0 and d4.in_flight == 0


def test_nano_12b_training_plan_is_printed(tmp_path):
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(main, ["plan-memory", "--recipe", "training/recipes/default.toml", "--preset",
                                    "nemotron-nano-v2-12b", "--gpus", "1", "--gpus", "8", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "stage stage1" in res.output and "fsdp2" in res.output and "12.31B" in res.output
    rows = json.loads(out.read_text())["rows"]
    usable80 = (80 - 1 - 0.05 * 80) * 1e9
    by = {(r["stage"], r["strategy"], r["gpus"]): r for r in rows}
    for stage in ("pretrain", "stage1", "stage2"):
        # 12.3B float32 parameters + grads + AdamW moments are 197 GB before any activation: DDP never fits
        assert by[stage, "ddp", 8]["total_ckpt"] > usable80
        assert by[stage, "fsdp2", 8]["total"] <= usable80
        one = by[stage, "fsdp2", 1]
        assert one["total"] == by[stage, "ddp", 1]["total"] + one["in_flight"]


@pytest.mark.parametrize("args, msg", [
    (["--gpus", "0"], "--gpus"),
    (["--gpus", "3"], "batch_size"),
    (["SOURCE_DIR"], "SOURCE"),
])
def test_bad_training_plan_input_exits_2(tmp_path, args, msg):
    res = CliRunner().invoke(main, ["plan-memory", "--recipe", "training/recipes/default.toml", *args])
    assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, res.output


def test_missing_recipe_exits_2(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text(to_toml(tiny_recipe(tmp_path)).replace("batch_size", "batch_sise", 1))
    for path in (tmp_path / "none.toml", bad):
        res = CliRunner().invoke(main, ["plan-memory", "--recipe", str(path)])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
