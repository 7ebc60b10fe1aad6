"""Recipes: the default one validates; bad ones are refused before training, naming the field."""

import subprocess
import sys

import pytest

from elastic_export.errors import ConfigError
from train_helpers import tiny_recipe, to_toml
from training.recipe import load_recipe, validate_recipe


def refused(tmp_path, field, **overrides):
    r = tiny_recipe(tmp_path, **overrides)
    with pytest.raises(ConfigError) as e:
        validate_recipe(r, path="recipe.toml")
    assert e.value.field == field, str(e.value)
    assert f"'{field}'" in str(e.value)
    return str(e.value)


def test_default_recipe_is_valid():
    r = load_recipe("training/recipes/default.toml")
    assert [s["kind"] for s in r["stages"]] == ["pretrain", "elastic", "elastic"]
    assert [s["sampling"] for s in r["stages"][1:]] == ["sandwich", "sandwich"] and r["stages"][2]["weights"] == [0.5, 0.3, 0.2]
    assert r["router"]["freeze_after"] == "start" and r["router"]["nested"] and r["router"]["repair"]
    assert r["stages"][2]["seq_len"] > r["stages"][1]["seq_len"]


def test_elastify_recipe_from_the_shipped_nested_checkpoint_is_valid():
    r = load_recipe("training/recipes/elastify_default.toml")
    from training.recipe import parent_config

    assert parent_config(r).head_order == "rank_major" and r["budgets"]["fractions"] == [1.0, 0.6, 0.4]


def test_tiny_recipe_round_trips_through_toml(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text(to_toml(tiny_recipe(tmp_path)))
    r = load_recipe(f)
    assert r["stages"][2]["weights"] == [0.5, 0.3, 0.2] and r["router"]["lr"] == 1e-2


def test_missing_field(tmp_path):
    r = tiny_recipe(tmp_path)
    del r["stages"][1]["lr"]
    with pytest.raises(ConfigError, match=r"stages\[1\].lr.*is missing"):
        validate_recipe(r)


def test_mistyped_and_misspelt_fields(tmp_path):
    assert "must be int" in refused(tmp_path, "stages[0].seq_len", **{"stages.0.seq_len": "32"})
    assert "did you mean 'seq_len'" in refused(tmp_path, "stages[0].seqlen", **{"stages.0.seqlen": 32})
    refused(tmp_path, "stages[2].sampling", **{"stages.2.sampling": "weigthed"})
    refused(tmp_path, "router.lr", **{"router.lr": "fast"})
    refused(tmp_path, "model.config.hiden_size", **{"model.config.hiden_size": 32})
    refused(tmp_path, "stages[2].weights", **{"stages.2.weights": [0.5, 0.5]})


def test_nonexistent_paths(tmp_path):
    assert "does not exist" in refused(tmp_path, "data.sources[0].path", **{"data.sources.0.path": "nope.txt"})
    refused(tmp_path, "model.init", **{"model.init": str(tmp_path / "no_parent")})
    refused(tmp_path, "model.tokenizer", **{"model.tokenizer": "missing/tokenizer.json"})


def test_budgets_the_parent_cannot_satisfy(tmp_path):
    msg = refused(tmp_path, "budgets.fractions[2]", **{"budgets.fractions": [1.0, 0.75, 0.05]})
    assert "smallest configuration" in msg
    refused(tmp_path, "budgets.fractions[0]", **{"budgets.fractions": [1.5, 0.75, 0.5]})
    refused(tmp_path, "router.max_dropped_layers", **{"router.max_dropped_layers": 4})


def test_cli_bad_recipe_exits_2_with_one_line(tmp_path):
    r = tiny_recipe(tmp_path)
    r["stages"][0]["batch_size"] = "four"
    f = tmp_path / "bad.toml"
    f.write_text(to_toml(r))
    p = subprocess.run([sys.executable, "-m", "elastic_export.cli", "train", str(f)], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "stages[0].batch_size" in p.stderr
