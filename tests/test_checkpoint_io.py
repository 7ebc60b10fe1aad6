"""HF checkpoint I/O: formats, legacy configs, sharding, and clear errors on bad input."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import elastic_export as ee
from elastic_export.cli import main
from elastic_export.config import NANO_V2_12B_PATTERN, ModelConfig
from helpers import random_model


def _logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def test_roundtrip_single_and_sharded(tmp_path):
    model = random_model(3)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    for d in ("one", "sharded"):
        assert torch.equal(_logits(ee.load(tmp_path / d)), _logits(model))


def test_bf16_save_and_load(tmp_path):
    model = random_model(4)
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    back = ee.load(tmp_path)
    assert back.dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert ee.load(tmp_path, dtype="float32").dtype == torch.float32


def test_legacy_pattern_and_key_names():
    raw = {"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32, "hybrid_override_pattern": "M-*M",
           "mamba_num_heads": 4, "mamba_head_dim": 8, "mamba_n_groups": 2, "mamba_d_conv": 3,
           "mamba_chunk_size": 16, "ssm_state_size": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 8, "intermediate_size": 48, "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.layers_block_type == ["linear_attention", "mlp", "full_attention", "linear_attention"]
    assert (cfg.n_groups, cfg.conv_kernel, cfg.chunk_size) == (2, 3, 16)
    assert cfg.time_step_limit[1] == float("inf")
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.layers_block_type == cfg.layers_block_type and again.n_groups == 2


def test_nano_v2_12b_inspect_reports_published_size(tmp_path):
    cfg = ee.preset("nemotron-nano-v2-12b")
    assert cfg.hybrid_override_pattern == NANO_V2_12B_PATTERN and cfg.num_hidden_layers == 62
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "12,310,001,152" in result.output and "(12.31B)" in result.output
    assert "24.62 GB at BF16" in result.output
    assert sum(1 for line in result.output.splitlines() if " mamba2 " in line) == 28


def test_inspect_checks_weights_when_present(tmp_path):
    model = random_model(5)
    model.save_pretrained(tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 0 and "shapes match the config" in result.output
    assert f"{model.num_parameters():,}" in result.output


# ---- bad input: one line naming the file and the problem, exit code 2, no traceback -------------

def _break(kind, d):
    cfg_path = d / "config.json"
    weights = d / "model.safetensors"
    if kind == "missing_config":
        cfg_path.unlink()
        return "config.json is missing"
    if kind == "malformed_config":
        cfg_path.write_text("{not json")
        return "is not valid JSON"
    if kind == "unknown_layer":
        raw = json.loads(cfg_path.read_text())
        raw["layers_block_type"][1] = "transformer"
        raw.pop("hybrid_override_pattern")
        cfg_path.write_text(json.dumps(raw))
        return "unknown layer type 'transformer'"
    if kind == "missing_tensor":
        from safetensors.torch import load_file, save_file
        state = load_file(weights)
        state.pop("backbone.norm_f.weight")
        save_file(state, weights)
        return "'backbone.norm_f.weight' is missing"
    if kind == "wrong_shape":
        from safetensors.torch import load_file, save_file
        state = load_file(weights)
        state["backbone.norm_f.weight"] = torch.ones(7)
        save_file(state, weights)
        return "has shape (7,)"
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return "truncated or corrupt"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_config", "malformed_config", "unknown_layer", "missing_tensor",
                                  "wrong_shape", "truncated"])
def test_bad_checkpoint_is_refused_clearly(kind, tmp_path):
    d = tmp_path / "ckpt"
    random_model(6).save_pretrained(d)
    expect = _break(kind, d)
    with pytest.raises(ee.ElasticExportError) as err:
        ee.load(d)
    assert expect in str(err.value) and str(d) in str(err.value)
    result = CliRunner().invoke(main, ["inspect", str(d)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output and expect in result.output


def test_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ee.CheckpointError, match="not a checkpoint"):
        ee.load(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "elastic_export.cli", "inspect", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "config.json is missing" in proc.stderr


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import elastic_export.hf_io as io

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "write_safetensors", boom)
    with pytest.raises(RuntimeError):
        random_model(7).save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_rank_major_model_saves_in_hf_head_order(tmp_path):
    """A sorted (rank-major) model written as an HF checkpoint is converted to HF's head order."""
    import json as _json

    from helpers import hf_model
    from elastic_export.config import ModelConfig as _MC

    model = random_model(8, n_groups=2, mamba_num_heads=6, num_key_value_heads=2, num_attention_heads=6)
    cfg = _MC.from_dict({**model.config.to_dict(), "elastic": {"head_order": "rank_major"}})
    sorted_like = ee.build_model(cfg)
    sorted_like.load_state_dict(model.state_dict())  # same weights read in rank-major order
    sorted_like.save_pretrained(tmp_path)
    assert "elastic" not in _json.loads((tmp_path / "config.json").read_text())
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        assert (hf_model(tmp_path)(ids).logits - sorted_like(ids)).abs().max().item() <= 1e-4


def test_commands_default_to_the_shipped_model(tmp_path):
    from elastic_export.build import default_model_path

    if not (default_model_path() / "elastic.json").is_file():
        pytest.skip("the default model is not shipped in this checkout")
    r = CliRunner().invoke(main, ["inspect"])
    assert r.exit_code == 0, r.output
    assert "3 budgets over one weight copy" in r.output and "50pct" in r.output
    r = CliRunner().invoke(main, ["slice", "--budget", "75pct", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert ee.load(tmp_path / "s").num_parameters() < ee.load_nested(default_model_path()).model.num_parameters()


def test_cli_help_does_not_import_torch():
    """The CLI imports its machinery inside each command: --help stays fast and needs no torch."""
    code = ("import sys; from click.testing import CliRunner; from elastic_export.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0 and 'build' in r.output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
