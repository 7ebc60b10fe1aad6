"""Outputs written through a temporary directory get ordinary permissions (0o777 & ~umask), so
another user, or a container running as another uid, can read them."""

import os
import stat

import numpy as np
import pytest
from click.testing import CliRunner

from elastic_export.cli import main
from helpers import random_model
from train_helpers import tiny_recipe


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _unreadable(root):
    """Paths under root (root included) that other users cannot read (dirs: r-x, files: r)."""
    bad = []
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        need = 0o755 if p.is_dir() else 0o644
        if mode & need != need:
            bad.append(f"{p.relative_to(root.parent)} {oct(mode)}")
    return bad


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output


def test_every_output_is_readable_by_others(tmp_path, umask_022):
    from training.recipe import validate_recipe
    from training.trainer import train

    d = tmp_path
    random_model(4, vocab_size=300).save_pretrained(d / "parent")
    np.save(d / "calib.npy", np.random.RandomState(0).randint(0, 300, size=200))
    run("rank", d / "parent", "--calib", d / "calib.npy", "--seq-len", 16, "--samples", 4, "--out", d / "sorted")
    run("nest", d / "sorted", "--budget", "50%", "--out", d / "nested")
    run("slice", d / "nested", "--budget", "all", "--out", d / "slices")
    run("build", d / "nested", "--budget", "50pct", "--target", "onnx", "--out", d / "build")
    r = tiny_recipe(d, **{"stages": tiny_recipe(d)["stages"][:1], "budgets.names": ["full"],
                          "budgets.fractions": [1.0]})
    train(validate_recipe(r), out=d / "run")
    outputs = ["parent", "sorted", "nested", "slices", "build", "run"]
    assert all((d / o).is_dir() for o in outputs)
    assert (d / "run" / "checkpoint").is_dir()
    bad = [b for o in outputs for b in _unreadable(d / o)]
    assert not bad, bad


def test_umask_is_respected(tmp_path):
    """A stricter umask is the user's choice: the outputs follow it rather than a fixed mode."""
    old = os.umask(0o077)
    try:
        random_model(4).save_pretrained(tmp_path / "ck")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "ck" / "config.json").stat().st_mode) == 0o600
