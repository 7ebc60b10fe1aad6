"""Trainer: exact resume after a kill, torchrun on 2 CPU processes, gradient accumulation, outputs."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from train_helpers import tiny_recipe, torchrun_train
from elastic_export.nested import load_nested
from training.recipe import load_recipe, validate_recipe
from training.trainer import train



def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    r = tiny_recipe(tmp_path)
    full_run, killed_run = tmp_path / "a", tmp_path / "b"
    nested = train(validate_recipe(r), out=full_run)
    # "killed" after step 9 (last checkpoint at step 8, inside elastic stage 2), then resumed
    assert train(validate_recipe(r), out=killed_run, stop_after_step=9) is None
    assert max(losses(killed_run)) == 9
    train(validate_recipe(r), out=killed_run)
    a, b = losses(full_run), losses(killed_run)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert all(a[k] == b[k] for k in a), [(k, a[k], b[k]) for k in a if a[k] != b[k]]
    n1 = load_nested(nested)
    m1, budgets, manifest = n1.model, n1.budgets, n1.manifest
    m2 = load_nested(killed_run / "nested").model
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert set(budgets) == {"full", "75pct", "50pct"}
    assert {b["name"]: b["fraction"] for b in manifest["budgets"]} == {"full": 1.0, "75pct": 0.75, "50pct": 0.5}
    assert [b["params"] for b in manifest["budgets"]][0] == m1.num_parameters()
    x = torch.randint(3, 200, (1, 16))
    for name, sub in budgets.items():  # every budget runs from the one weight copy
        assert m1(x, subnet=sub).shape == (1, 16, 259)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    r = tiny_recipe(tmp_path, **{"stages": tiny_recipe(tmp_path)["stages"][:1]})
    train(validate_recipe(r), out=tmp_path / "a")
    train(validate_recipe(tiny_recipe(tmp_path, **{"stages": r["stages"], "train.grad_accum": 2})), out=tmp_path / "b")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)


def layout(nested: Path) -> dict:
    with safe_open(nested / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    manifest = json.loads((nested / "elastic.json").read_text())
    return {"files": sorted(p.name for p in nested.iterdir()), "shapes": shapes,
            "manifest_keys": sorted(manifest), "budgets": [b["name"] for b in manifest["budgets"]]}


def test_torchrun_two_processes_writes_the_same_format(tmp_path):
    r = tiny_recipe(tmp_path, **{"stages": tiny_recipe(tmp_path)["stages"][:2]})
    f = torchrun_train(r, tmp_path, 29611, timeout=120)
    single = train(load_recipe(f), out=tmp_path / "single")
    assert layout(tmp_path / "ddp" / "nested") == layout(single)
    assert sorted(losses(tmp_path / "ddp")) == sorted(losses(tmp_path / "single"))
    # same data and budget per step: the 2-process losses track the 1-process ones closely
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert abs(a[1] - b[1]) < 1e-4


def test_elastify_an_existing_parent(tmp_path):
    from elastic_export.model import build_model
    from training.recipe import parent_config

    r = tiny_recipe(tmp_path)
    parent = tmp_path / "parent"
    build_model(parent_config(validate_recipe(r)), seed=5).save_pretrained(parent)
    stage = {**r["stages"][1], "sampling": "weighted", "weights": [1.0, 1.0, 1.0]}
    first_full = {**stage, "name": "full-only", "tokens": 4 * 32, "weights": [1.0, 0.0, 0.0]}
    r = tiny_recipe(tmp_path, **{"model.init": str(parent), "stages": [first_full, stage]})
    del r["model"]["config"]
    nested = train(validate_recipe(r), out=tmp_path / "e")
    recs = [json.loads(l) for l in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    full_steps = [x for x in recs if x.get("budget") == "full"]
    assert full_steps and full_steps[0]["step"] == 1 and full_steps[0]["loss"] == 0.0  # student == teacher
    n = load_nested(nested)
    model, budgets, manifest = n.model, n.budgets, n.manifest
    assert manifest["budgets"][0]["params"] == model.num_parameters() and len(budgets) == 3


def test_derive_new_budgets_from_a_nested_checkpoint(tmp_path):
    r = tiny_recipe(tmp_path, **{"stages": tiny_recipe(tmp_path)["stages"][:2]})
    first = train(validate_recipe(r), out=tmp_path / "a")
    r2 = tiny_recipe(tmp_path, **{"model.init": str(first), "stages": r["stages"][1:2],
                                  "budgets.names": ["full", "60pct"], "budgets.fractions": [1.0, 0.6]})
    del r2["model"]["config"]
    n = load_nested(train(validate_recipe(r2), out=tmp_path / "b"))
    assert set(n.budgets) == {"full", "60pct"} and n.config.head_order == "rank_major"
