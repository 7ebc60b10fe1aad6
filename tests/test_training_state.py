"""The training state is written as safetensors + JSON (no pickle) and comes back exactly."""

import random

import pytest
import torch

from elastic_export.errors import CheckpointError
from training import checkpoint as ckpt


def test_state_round_trips_tensors_tuples_and_int_keys(tmp_path):
    net = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(7, 5)).square().sum().backward()
    opt.step()
    random.seed(3)
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 11, "rng": ckpt.rng_states(),
             "evals": [{"loss": 0.5, "inf": float("inf")}], "depth": None, "mask": torch.tensor([True, False])}
    ckpt.save_state(tmp_path / "c", state)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["state.json", "state.safetensors"]
    back = ckpt.load_state(tmp_path / "c")
    assert back["step"] == 11 and back["evals"] == state["evals"] and back["depth"] is None
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys stay ints
    for k, v in state["optimizer"]["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for k, v in net.state_dict().items():
        assert torch.equal(back["model"][k], v)
    assert torch.equal(back["mask"], state["mask"])
    ckpt.set_rng_states(back["rng"])  # python's state comes back as the tuple random.setstate needs
    a = random.random()
    random.seed(3)
    assert a == random.random()
    opt2 = torch.optim.AdamW(torch.nn.Linear(5, 3).parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])


def test_an_old_pickle_state_is_refused_not_loaded(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        ckpt.load_state(tmp_path)
    assert ckpt.load_state(tmp_path / "missing") is None


def test_tensors_sharing_storage_round_trip(tmp_path):
    """Tied weights, views and transposes share storage, which safetensors refuses: they are copied."""
    w = torch.randn(6, 5)
    state = {"a": w, "tied": w, "rows": w[:2], "t": w.t(), "e": torch.empty(0), "e2": torch.empty(0)}
    ckpt.save_state(tmp_path / "c", state)
    back = ckpt.load_state(tmp_path / "c")
    assert all(torch.equal(back[k], v) for k, v in state.items())
