"""Issue 10: the method's promises on a tiny model: budgets land in band, elastic training helps every
budget, sandwich sampling and router freezing, accumulation / multi-process equal one big batch."""

import json
from pathlib import Path

import torch

from train_helpers import tiny_recipe, torchrun_train
from elastic_export.nested import load_nested
from training import checkpoint as ckpt
from training.distill import kd_loss
from training.recipe import validate_recipe
from training.trainer import train



def records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def elastic_only(tmp_path, stages, **kw):
    """A tiny recipe whose parent first learns the (repetitive) corpus, so that pruning loses something."""
    pre = {**tiny_recipe(tmp_path)["stages"][0], "tokens": 40 * 4 * 32, "lr": 1e-2, "warmup_steps": 4}
    return tiny_recipe(tmp_path, **{"stages": [pre, *stages], **kw})


def test_short_run_ends_in_band_nested_and_reports_it(tmp_path):
    r = tiny_recipe(tmp_path, **{"router.nested": True, "router.embedding_multiple": 8})
    nested = train(validate_recipe(r), out=tmp_path / "run")
    m = json.loads((nested / "elastic.json").read_text())
    full = m["budgets"][0]["params"]
    tol = validate_recipe(r)["router"]["tolerance"]
    for b in m["budgets"][1:]:
        assert abs(b["params"] / (b["fraction"] * full) - 1) <= tol, b
    final = [x for x in records(tmp_path / "run") if x.get("event") == "budgets_final"][-1]["budgets"]
    assert all(v["in_band"] for v in final.values()), final
    subs = load_nested(nested).budgets
    big, small = subs["75pct"], subs["50pct"]
    assert small.hidden <= big.hidden
    for a, b in zip(small.layers, big.layers):
        assert a.kept <= b.kept and all((getattr(a, f) or 0) <= (getattr(b, f) or 0)
                                        for f in ("mamba_heads", "mamba_head_dim", "attn_heads", "ffn"))


def test_elastic_training_lowers_every_smaller_budgets_kd(tmp_path):
    st = {"name": "stage1", "kind": "elastic", "tokens": 30 * 4 * 32, "seq_len": 32, "batch_size": 4, "lr": 3e-3,
          "warmup_steps": 2, "sampling": "sandwich"}
    r = elastic_only(tmp_path, [st], **{"router.freeze_after": "start", "router.embedding_multiple": 8})
    nested = train(validate_recipe(r), out=tmp_path / "run")
    n = load_nested(nested)
    teacher = ckpt.load_state(tmp_path / "run" / "teacher")["model"]
    from elastic_export.model import NemotronHForCausalLM

    parent = NemotronHForCausalLM(n.config)
    parent.load_state_dict(teacher)
    parent.eval()
    from elastic_export.tokenizer import ByteTokenizer
    from train_helpers import TEXT

    ids = torch.tensor(ByteTokenizer().encode(TEXT[:4 * 40 + 7]))[7:]
    x = ids[:4 * 40].view(4, 40)  # text windows like the training data
    kd = {}
    with torch.no_grad():
        t = parent(x)
        for name, sub in n.budgets.items():
            kd[name] = (float(kd_loss(parent(x, subnet=sub), t)), float(kd_loss(n.model(x, subnet=sub), t)))
    for name, (before, after) in kd.items():
        if name == "full":  # the parent itself: KD starts at 0; sharing must cost it far less than pruning costs
            assert after < 0.25 * min(b for n_, (b, _) in kd.items() if n_ != "full"), kd
        else:
            assert after < 0.7 * before, kd


def test_router_freezes_after_stage1_and_stage2_trains_fixed_architectures(tmp_path):
    r = tiny_recipe(tmp_path, **{"router.freeze_after": "stage1", "router.embedding_multiple": 8})
    nested = train(validate_recipe(r), out=tmp_path / "run")
    recs = records(tmp_path / "run")
    frozen = [x for x in recs if x.get("event") == "router_frozen"]
    assert len(frozen) == 1 and all(v["in_band"] for v in frozen[0]["budgets"].values())
    s2 = [x for x in recs if x.get("stage") == "stage2" and "loss" in x]
    assert s2 and all(x["router_lr"] == 0.0 and x["budget_loss"] == 0.0 for x in s2)
    manifest = json.loads((nested / "elastic.json").read_text())
    for b in manifest["budgets"][1:]:
        assert abs(b["params"] / manifest["budgets"][0]["params"] - frozen[0]["budgets"][b["name"]]["final"]) < 1e-9
    st = {s["name"]: s for s in manifest["training"]["stages"]}
    assert sum(st["stage2"]["steps_per_budget"].values()) == st["stage2"]["steps"]  # one budget per step


def test_sandwich_step_trains_every_budget_on_one_teacher_forward(tmp_path):
    st = {"name": "stage1", "kind": "elastic", "tokens": 3 * 4 * 32, "seq_len": 32, "batch_size": 4, "lr": 1e-3,
          "warmup_steps": 2, "sampling": "sandwich", "weights": [0.5, 0.3, 0.2]}
    r = elastic_only(tmp_path, [st])
    nested = train(validate_recipe(r), out=tmp_path / "run")
    steps = [x for x in records(tmp_path / "run") if x.get("stage") == "stage1" and "loss" in x]
    assert steps and all(x["budget"] == "all" and set(x["budgets"]) == {"full", "75pct", "50pct"} for x in steps)
    for x in steps:  # the logged loss is the weighted sum of the budgets' losses
        parts = x["budgets"]
        want = sum(w * (parts[n]["task_loss"] + parts[n]["budget_loss"]) for w, n in
                   zip([0.5, 0.3, 0.2], ["full", "75pct", "50pct"]))
        assert abs(x["loss"] - want) < 1e-5, (x["loss"], want)
    counts = json.loads((nested / "elastic.json").read_text())["training"]["stages"][1]["steps_per_budget"]
    assert counts == {"full": 3, "75pct": 3, "50pct": 3}


def test_gradient_accumulation_equals_one_big_batch_in_elastic_stages(tmp_path):
    stages = tiny_recipe(tmp_path)["stages"]
    sandwich = {**stages[2], "name": "stage3", "sampling": "sandwich"}
    r1 = tiny_recipe(tmp_path, **{"stages": [*stages, sandwich]})
    r2 = tiny_recipe(tmp_path, **{"stages": [*stages, sandwich], "train.grad_accum": 2})
    a = train(validate_recipe(r1), out=tmp_path / "a")
    b = train(validate_recipe(r2), out=tmp_path / "b")
    la = {x["step"]: x["loss"] for x in records(tmp_path / "a") if "loss" in x}
    lb = {x["step"]: x["loss"] for x in records(tmp_path / "b") if "loss" in x}
    assert sorted(la) == sorted(lb) and all(abs(la[k] - lb[k]) < 1e-4 for k in la), (la, lb)
    ma, mb = load_nested(a).model.state_dict(), load_nested(b).model.state_dict()
    assert max(float((ma[k] - mb[k]).abs().max()) for k in ma) < 1e-4


def test_two_processes_equal_one_after_several_optimizer_steps(tmp_path):
    stages = tiny_recipe(tmp_path)["stages"]
    # one budget per step with the router learning (sandwich under DDP differs by ~2e-4 here: an open issue)
    r = tiny_recipe(tmp_path, **{"stages": [stages[0], {**stages[1], "tokens": 6 * 4 * 32}],
                                 "router.freeze_after": "stage1"})
    torchrun_train(r, tmp_path, 29613)
    single = train(validate_recipe(r), out=tmp_path / "single")
    n_steps = json.loads((single / "elastic.json").read_text())["training"]["steps"]
    assert n_steps >= 10
    a, b = load_nested(tmp_path / "ddp" / "nested").model.state_dict(), load_nested(single).model.state_dict()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst
