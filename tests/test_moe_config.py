"""Every field of transformers' NemotronHConfig, dense and MoE: a config transformers accepts either
works here (the same structure: parameter counts equal to transformers' on the meta device, and
the field survives our config.json) or is refused with a ConfigError naming the field. Plus the
published Nemotron 3 configs: parameter counts, active parameters, inspect and plan-memory, and the
commands that refuse MoE models for now."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import elastic_export as ee
from elastic_export.accounting import count_active_params, count_params
from elastic_export.cli import main
from elastic_export.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"
NANO, SUPER = FIXTURES / "nemotron-3-nano-30b-a3b.config.json", FIXTURES / "nemotron-3-super-120b-a12b.config.json"

BASE = dict(vocab_size=61, hidden_size=24, layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
            num_attention_heads=4, num_key_value_heads=2, head_dim=6, intermediate_size=20, mamba_num_heads=4,
            mamba_head_dim=6, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8, n_routed_experts=6,
            num_experts_per_tok=2, moe_intermediate_size=10, moe_shared_expert_intermediate_size=14)

# field -> a value other than BASE's / transformers' default. Accepted unless listed in REFUSED.
VARY = {
    "vocab_size": 77, "hidden_size": 32, "layers_block_type": ["moe", "mlp", "linear_attention", "moe"],
    "tie_word_embeddings": True, "use_cache": False, "num_logits_to_keep": 3, "pad_token_id": 5, "bos_token_id": 6,
    "eos_token_id": [2, 11], "num_attention_heads": 6, "num_key_value_heads": 1, "head_dim": 10,
    "max_position_embeddings": 99, "attention_bias": True, "attention_dropout": 0.1, "sliding_window": 16,
    "intermediate_size": 30, "mlp_hidden_act": "gelu", "mlp_bias": True, "use_mamba_kernels": False,
    "ssm_state_size": 12, "mamba_num_heads": 6, "mamba_head_dim": 10, "mamba_hidden_act": "gelu", "n_groups": 1,
    "conv_kernel": 3, "expand": 3, "time_step_min": 0.01, "time_step_max": 0.2, "time_step_limit": [0.0, 5.0],
    "time_step_floor": 1e-3, "use_conv_bias": False, "chunk_size": 16, "mamba_proj_bias": True,
    "mamba_ssm_cache_dtype": "bfloat16", "n_routed_experts": 8, "output_router_logits": True,
    "n_shared_experts": 2, "moe_intermediate_size": 9, "moe_shared_expert_intermediate_size": 11,
    "moe_latent_size": 12, "moe_shared_expert_overlap": False, "num_experts_per_tok": 3,
    "routed_scaling_factor": 2.5, "n_group": 2, "topk_group": 2, "norm_topk_prob": False,
    "num_nextn_predict_layers": 1, "mtp_layers_block_type": ["full_attention", "moe"], "use_bias": True,
    "initializer_range": 0.05, "layer_norm_epsilon": 1e-4, "residual_in_fp32": True, "hidden_dropout": 0.1,
    "rescale_prenorm_residual": False,
}
WITH = {"topk_group": {"n_group": 2}}  # a value that needs another field to be valid
# fields whose value above transformers takes but we refuse, and the words the refusal must say
REFUSED = {"n_shared_experts": "one shared expert"}
# configs transformers accepts and cannot run (or runs arbitrarily); we refuse them, naming the field
BAD = [
    (dict(n_routed_experts=5, n_group=2), "n_routed_experts", "evenly"),
    (dict(n_routed_experts=2, n_group=2, topk_group=1, num_experts_per_tok=1), "n_routed_experts", "two best"),
    (dict(n_group=2, topk_group=3), "topk_group", "at most 2"),
    (dict(n_group=2, topk_group=1, num_experts_per_tok=4), "num_experts_per_tok", "masked experts"),
    (dict(moe_shared_expert_intermediate_size=0), "moe_shared_expert_intermediate_size", "intermediate_size"),
    (dict(n_shared_experts=0), "n_shared_experts", "one shared expert"),
    (dict(layers_block_type=["linear_attention", "moe"], num_experts_per_tok=7), "num_experts_per_tok", "at most 6"),
]


def _theirs(**changes):
    from transformers import NemotronHConfig

    return NemotronHConfig(**{**BASE, **changes})


def _their_params(hf_cfg) -> int:
    from transformers import NemotronHForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in NemotronHForCausalLM(hf_cfg).parameters())


def test_the_table_covers_every_field_of_nemotronhconfig():
    from transformers import NemotronHConfig

    own = set(NemotronHConfig.__annotations__) - {"model_type", "attribute_map", "base_model_tp_plan",
                                                   "base_model_ep_plan"}
    assert own == set(VARY), f"classify the new fields: {sorted(own ^ set(VARY))}"


@pytest.mark.parametrize("field", sorted(VARY))
def test_each_field_works_or_is_refused_by_name(field):
    hf = _theirs(**{field: VARY[field], **WITH.get(field, {})})
    raw = hf.to_dict()
    if field in REFUSED:
        with pytest.raises(ConfigError) as e:
            ee.ModelConfig.from_dict(raw)
        assert e.value.field == field and REFUSED[field] in str(e.value)
        return
    ours = ee.ModelConfig.from_dict(raw)
    counted = ours
    if field == "tie_word_embeddings":  # transformers never ties: its checkpoints carry lm_head.weight, and a
        from elastic_export.hf_io import resolve_tying  # load of one follows the weights (hf_io.resolve_tying)

        counted = resolve_tying(ours, ["lm_head.weight"])
    assert count_params(counted) == ee.build_model(counted, device="meta").num_parameters() == _their_params(hf)
    back = ours.to_dict()  # our config.json keeps what transformers reads
    from transformers import NemotronHConfig

    again = NemotronHConfig.from_dict(back).to_dict()
    assert again.get(field) == raw.get(field) or field in ("eos_token_id",), (again.get(field), raw.get(field))


@pytest.mark.parametrize("changes,field,words", BAD)
def test_configs_transformers_cannot_run_are_refused_with_the_field(changes, field, words):
    raw = _theirs(**changes).to_dict()  # transformers' config class takes it
    with pytest.raises(ConfigError) as e:
        ee.ModelConfig.from_dict(raw)
    assert e.value.field == field and words in str(e.value), str(e.value)


def test_a_dense_config_keeps_moe_fields_out_of_config_json():
    dense = ee.ModelConfig.from_dict(_theirs(layers_block_type=["linear_attention", "mlp"]).to_dict())
    assert "num_experts_per_tok" not in dense.to_dict() and "n_routed_experts" not in dense.to_dict()
    assert "num_experts_per_tok" in ee.ModelConfig.from_dict(_theirs().to_dict()).to_dict()


def test_the_legacy_pattern_letter_e_is_moe():
    cfg = ee.ModelConfig.from_file(NANO)
    assert cfg.layers_block_type.count("moe") == 23 and cfg.hybrid_override_pattern == json.loads(
        NANO.read_text())["hybrid_override_pattern"]


@pytest.mark.parametrize("path,preset,total,active", [
    (NANO, "nemotron-3-nano-30b-a3b", 31_577_937_344, 3_580_073_408),
    (SUPER, "nemotron-3-super-120b-a12b", 120_668_687_360, 12_770_216_960),
])
def test_published_configs_count_as_transformers_does(path, preset, total, active):
    from transformers import NemotronHConfig

    cfg = ee.ModelConfig.from_file(path)
    assert _their_params(NemotronHConfig(**json.loads(path.read_text()))) == total  # transformers' own count
    assert count_params(cfg) == total and count_params(ee.config.preset(preset)) == total
    assert count_active_params(cfg) == active
    # active by hand: every routed expert weight counted top-k of E times
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    routed = cfg.layers_block_type.count("moe") * E * 2 * cfg.moe_intermediate_size * cfg.moe_input_size
    assert active == total - routed + routed * k // E
    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 0, out.output
    assert f"{total:,}" in out.output and f"{active:,}" in out.output
    layer1 = next(line for line in out.output.splitlines() if line.strip().startswith("1  moe"))
    assert f"{E} experts" in layer1 and f"top {k}" in layer1
    out = CliRunner().invoke(main, ["inspect", "--preset", preset])
    assert out.exit_code == 0 and f"{total:,}" in out.output


def test_plan_memory_shows_active_compute_and_full_weight_memory():
    out = CliRunner().invoke(main, ["plan-memory", "--preset", "nemotron-3-nano-30b-a3b", "--device", "custom:80"])
    assert out.exit_code == 0, out.output
    assert "3.58B active per token" in out.output and "31.58B parameters in memory" in out.output
    from elastic_export.accounting import memory

    m = memory(ee.config.preset("nemotron-3-nano-30b-a3b"), dtype="bfloat16")
    assert m.weights > 2 * count_params(ee.config.preset("nemotron-3-nano-30b-a3b"))  # float32 routers on top
    assert f"{m.weights / 1e9:.2f} GB" in out.output


def test_the_shipped_nested_checkpoint_format_1_still_reads():
    from elastic_export.build import default_model_path
    from elastic_export.nested import read_manifest

    mf, cfg, budgets = read_manifest(default_model_path())
    assert mf["format_version"] == 1 and not cfg.has_moe and len(budgets) >= 2
    assert all(dataclasses.asdict(w)["experts"] is None for b in budgets.values() for w in b.layers)
