"""`elastic_export.load` opens every checkpoint the toolkit writes: HF directories, slices
(homogeneous and heterogeneous), and nested checkpoints from `rank`, `nest` and `train`."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import elastic_export as ee
from elastic_export.cli import main
from helpers import random_model
from train_helpers import tiny_recipe


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("load")
    parent = random_model(2, vocab_size=300)
    parent.save_pretrained(d / "parent")
    np.save(d / "calib.npy", np.random.RandomState(1).randint(0, 300, size=300))
    run("rank", d / "parent", "--calib", d / "calib.npy", "--seq-len", 24, "--samples", 8, "--out", d / "sorted")
    run("nest", d / "sorted", "--budget", "75%", "--budget", "50%", "--mode", "heterogeneous", "--out", d / "nested")
    run("slice", d / "nested", "--budget", "all", "--layout", "compact", "--out", d / "slices")
    run("slice", d / "nested", "--budget", "all", "--out", d / "padded")  # the default layout
    return d, parent.eval()


def _x(vocab, seed=0):
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_load_rank_and_nest_outputs(outputs):
    d, parent = outputs
    x = _x(300)
    sorted_model = ee.load(d / "sorted")  # a nested checkpoint with the one budget of the parent
    assert list(sorted_model.budgets) == ["full"]
    assert (sorted_model(x) - parent(x)).abs().max() <= 1e-5
    elastic = ee.load(d / "nested")
    assert list(elastic.budgets) == ["full", "75pct", "50pct"]
    ck = ee.load_nested(d / "nested")
    for name, sub in elastic.budgets.items():
        ref = ck.model(x, subnet=ck.budgets[name])
        assert sub == ck.budgets[name]
        assert torch.equal(elastic(x, subnet=sub), ref)
        one = ee.load(d / "nested", budget=name)  # standalone weights of that budget
        assert list(one.budgets) == ["full"] and one.num_parameters() <= elastic.num_parameters()
        assert (one(x) - ref).abs().max() <= 1e-5, name
        sl = ee.load(d / "slices" / name)  # the compact slice on disk reads the same
        assert (sl(x) - ref).abs().max() <= 1e-5, name
        padded = ee.load(d / "padded" / name)  # a plain config (tests/test_padded_slices.py: its function)
        assert padded.config.layer_widths is None and padded.num_parameters() >= sl.num_parameters()
    assert ee.load(d / "nested", budget="50pct").num_parameters() < ee.load(d / "nested", budget="75pct").num_parameters()
    gen = elastic.generate(x[:1], 5, subnet=elastic.budgets["50pct"])
    assert torch.equal(gen, ee.load(d / "nested", budget="50pct").generate(x[:1], 5))


def test_load_refuses_unknown_budget_and_build_dirs(outputs, tmp_path):
    d, _ = outputs
    with pytest.raises(ee.BudgetError, match="unknown budget 'tiny'.*75pct"):
        ee.load(d / "nested", budget="tiny")
    with pytest.raises(ee.BudgetError, match="unknown budget"):
        ee.load(d / "parent", budget="50pct")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "build.json").write_text("{}")
    with pytest.raises(ee.CheckpointError, match="is a build directory"):
        ee.load(tmp_path / "b")


def test_load_train_output(tmp_path):
    from training.recipe import validate_recipe
    from training.trainer import train

    r = tiny_recipe(tmp_path, **{"stages": tiny_recipe(tmp_path)["stages"][:2], "train.checkpoint_every": 100})
    nested = train(validate_recipe(r), out=tmp_path / "run")
    model = ee.load(nested)
    ck = ee.load_nested(nested)
    assert list(model.budgets) == list(ck.budgets) and set(ck.budgets) == {"full", "75pct", "50pct"}
    x = _x(model.config.vocab_size, 3)
    with torch.no_grad():
        for name, sub in model.budgets.items():
            ref = ck.model(x, subnet=sub)
            assert torch.equal(model(x, subnet=sub), ref)
            assert (ee.load(nested, budget=name)(x) - ref).abs().max() <= 1e-5
