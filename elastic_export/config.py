"""Model configuration: one dataclass, read from and written to Hugging Face `nemotron_h` config.json.

Layer types follow transformers: ``linear_attention`` (Mamba2), ``full_attention`` (GQA, no
positional encoding), ``mlp`` (relu^2 by default; the activations are those of
:mod:`elastic_export.activations`), ``moe`` (Nemotron 3: a top-k routed mixture of relu^2 experts
plus one shared expert, :mod:`elastic_export.moe`). The legacy ``hybrid_override_pattern`` string
(M, *, -, E) and the legacy ``mamba_*`` key names are accepted on read.

MoE fields carry transformers' NemotronHConfig names and defaults: ``n_routed_experts``,
``num_experts_per_tok``, ``moe_intermediate_size``, ``moe_shared_expert_intermediate_size``,
``n_shared_experts``, ``moe_latent_size``, ``n_group``, ``topk_group``, ``norm_topk_prob``,
``routed_scaling_factor``, ``moe_shared_expert_overlap``; the experts use ``mlp_hidden_act``. A
config without MoE layers keeps them out of its config.json (readers such as llama.cpp's converter
take ``num_experts_per_tok`` for a sign of MoE).

Two fields are ours and absent from plain HF configs:
- ``layer_widths``: per-layer widths of a heterogeneous slice (a list with one dict per layer,
  keys among ``mamba_num_heads``, ``mamba_head_dim``, ``num_attention_heads``,
  ``intermediate_size``, ``n_routed_experts``, ``moe_intermediate_size``,
  ``moe_shared_expert_intermediate_size``); None for a homogeneous model. A MoE layer's top-k is
  derived, never stored per layer (:func:`elastic_export.elastic.moe_top_k`).
- ``padded_widths``: the real per-layer widths of a padded slice (same form as ``layer_widths``): its
  weights have the config's one width per type, the extra rows zero (:mod:`elastic_export.padding`).
  A note for ``inspect``; every reader computes the budget's function without it.
- ``head_order``: ``group_contiguous`` (HF: head h is in group h // (H/G)) or ``rank_major``
  (nested checkpoints: head h is in group h % G, so k heads per group is a prefix of k*G). MoE
  experts follow the same order over their ``n_group`` routing groups.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import activations
from .errors import ConfigError

LAYER_TYPES = ("linear_attention", "full_attention", "mlp", "moe")
PATTERN_CHARS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
PATTERN_OF = {v: k for k, v in PATTERN_CHARS.items()}
HEAD_ORDERS = ("group_contiguous", "rank_major")
MOE_WIDTH_KEYS = ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size")
WIDTH_KEYS = ("mamba_num_heads", "mamba_head_dim", "num_attention_heads", "intermediate_size") + MOE_WIDTH_KEYS
# The MoE fields (transformers' names and defaults), written to config.json only when a layer is MoE.
MOE_FIELDS = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
              "moe_shared_expert_intermediate_size", "n_shared_experts", "moe_latent_size",
              "moe_shared_expert_overlap", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")
# Layer type names of older configs (transformers' remap_legacy_layer_types) -> ours.
LEGACY_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}

# Legacy key names (older NemotronH / Mamba2 configs) -> our field names.
LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "mamba_d_state": "ssm_state_size",
    "mamba_headdim": "mamba_head_dim",
    "mamba_nheads": "mamba_num_heads",
    "attention_head_dim": "head_dim",
    "d_model": "hidden_size",
    "norm_eps": "layer_norm_epsilon",
    "rms_norm_eps": "layer_norm_epsilon",
}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    layers_block_type: list[str]
    mamba_num_heads: int = 8
    mamba_head_dim: int = 16
    n_groups: int = 1
    ssm_state_size: int = 16
    conv_kernel: int = 4
    chunk_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 256
    mlp_hidden_act: str = "relu2"
    mamba_hidden_act: str = "silu"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    use_conv_bias: bool = True
    use_bias: bool = False
    mamba_proj_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    n_shared_experts: int = 1
    moe_latent_size: int | None = None
    moe_shared_expert_overlap: bool = True  # no effect on the function (transformers ignores it too)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    residual_in_fp32: bool = False
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    max_position_embeddings: int = 4096
    head_order: str = "group_contiguous"
    layer_widths: list[dict[str, int]] | None = None
    padded_widths: list[dict[str, int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown HF keys, kept on save

    def __post_init__(self):
        self.layers_block_type = list(self.layers_block_type)
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        self.validate()

    # ---- derived -------------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers_block_type)

    @property
    def has_moe(self) -> bool:
        return "moe" in self.layers_block_type

    @property
    def moe_input_size(self) -> int:
        """Input (and output) width of the routed experts: the latent size, else hidden_size."""
        return self.hidden_size if self.moe_latent_size is None else self.moe_latent_size

    @property
    def hybrid_override_pattern(self) -> str:
        return "".join(PATTERN_OF[t] for t in self.layers_block_type)

    def layer_dims(self, i: int) -> dict[str, int]:
        """Widths of layer i: the config's, overridden by ``layer_widths[i]`` when heterogeneous."""
        dims = {k: getattr(self, k) for k in WIDTH_KEYS}
        if self.layer_widths is not None:
            dims.update(self.layer_widths[i])
        return dims

    # ---- validation ----------------------------------------------------------------------------
    def validate(self, path: str | Path | None = None) -> None:
        def bad(fld: str, msg: str, fix: str | None = None):
            raise ConfigError(msg, path=path, field=fld, fix=fix)

        for t in self.layers_block_type:
            if t not in LAYER_TYPES:
                bad("layers_block_type", f"unknown layer type {t!r}", f"use one of {', '.join(LAYER_TYPES)}")
        if not self.layers_block_type:
            bad("layers_block_type", "the model has no layers", "list at least one layer type")
        for name in ("vocab_size", "hidden_size", "mamba_num_heads", "mamba_head_dim", "n_groups",
                     "ssm_state_size", "conv_kernel", "chunk_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive integer, got {v!r}")
        for fld, usual in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
            why = activations.unsupported(getattr(self, fld))
            if why is not None:
                bad(fld, why, f"use one of transformers' ACT2FN names supported here (NemotronH uses {usual!r}): "
                    f"{', '.join(activations.NAMES)}")
        self._validate_moe(bad)
        if self.head_order not in HEAD_ORDERS:
            bad("head_order", f"unknown head order {self.head_order!r}", f"use one of {HEAD_ORDERS}")
        for fld in ("layer_widths", "padded_widths"):
            widths = getattr(self, fld)
            if widths is None:
                continue
            if len(widths) != self.num_hidden_layers:
                bad(fld, f"has {len(widths)} entries for {self.num_hidden_layers} layers", "give one dict per layer")
            for i, w in enumerate(widths):
                for k in w:
                    if k not in WIDTH_KEYS:
                        bad(f"{fld}[{i}].{k}", "unknown width key", f"use one of {WIDTH_KEYS}")
                    elif fld == "padded_widths" and not 0 < w[k] <= getattr(self, k):
                        bad(f"{fld}[{i}].{k}", f"{w[k]} is outside 1..{getattr(self, k)} (the padded width)")
        if self.padded_widths is not None and self.layer_widths is not None:
            bad("padded_widths", "a padded slice has one width per layer type", "drop layer_widths or padded_widths")
        for i, t in enumerate(self.layers_block_type):
            d = self.layer_dims(i)
            if t == "linear_attention" and d["mamba_num_heads"] % self.n_groups:
                bad("mamba_num_heads", f"layer {i}: {d['mamba_num_heads']} Mamba heads are not divisible by "
                    f"n_groups={self.n_groups}", "use a multiple of n_groups")
            if t == "full_attention" and d["num_attention_heads"] % self.num_key_value_heads:
                bad("num_attention_heads", f"layer {i}: {d['num_attention_heads']} heads are not divisible by "
                    f"num_key_value_heads={self.num_key_value_heads}", "use a multiple of num_key_value_heads")
            if t == "moe":
                check_expert_groups(d["n_routed_experts"], self.n_group,
                                    lambda msg, fix: bad("n_routed_experts", f"layer {i}: {msg}", fix))

    def _validate_moe(self, bad) -> None:
        """The MoE fields: types always (a dense config carries transformers' defaults), the routing
        constraints only when a layer is MoE. Each refusal names what transformers would do instead."""
        if self.moe_shared_expert_intermediate_size == 0:
            bad("moe_shared_expert_intermediate_size", "is 0: transformers' NemotronHMLP reads 0 as unset and "
                "builds a shared expert of intermediate_size neurons instead", "give the shared expert's width")
        for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "moe_shared_expert_intermediate_size", "n_group", "topk_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive integer, got {v!r}")
        if not isinstance(self.n_shared_experts, int) or isinstance(self.n_shared_experts, bool):
            bad("n_shared_experts", f"must be an integer, got {self.n_shared_experts!r}")
        L = self.moe_latent_size
        if L is not None and (not isinstance(L, int) or isinstance(L, bool) or L <= 0):
            bad("moe_latent_size", f"must be a positive integer or null, got {L!r}")
        r = self.routed_scaling_factor
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            bad("routed_scaling_factor", f"must be a finite number, got {r!r}")
        for name in ("norm_topk_prob", "moe_shared_expert_overlap"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"must be true or false, got {getattr(self, name)!r}")
        if not self.has_moe:
            return
        if self.n_shared_experts != 1:
            bad("n_shared_experts", f"is {self.n_shared_experts}: transformers' NemotronHMoE ignores this field and "
                "always builds exactly one shared expert of moe_shared_expert_intermediate_size neurons, so the "
                "checkpoint would not compute what the config says", "set n_shared_experts to 1")
        E, G = self.n_routed_experts, self.n_group
        check_expert_groups(E, G, lambda msg, fix: bad("n_routed_experts", msg, fix))
        if self.topk_group > G:
            bad("topk_group", f"{self.topk_group} routing groups chosen per token out of n_group={G}",
                f"use at most {G}")
        reach = self.topk_group * (E // G)
        if self.num_experts_per_tok > reach:
            bad("num_experts_per_tok", f"{self.num_experts_per_tok} experts per token, but the {self.topk_group} "
                f"chosen group(s) of {E // G} experts hold only {reach}: transformers would pick masked experts "
                "(an arbitrary choice among -inf scores)", f"use at most {reach}, or raise topk_group")

    # ---- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str | Path | None = None) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError("config must be a JSON object", path=path)
        raw = dict(raw)
        model_type = raw.get("model_type", "nemotron_h")
        if model_type != "nemotron_h":
            raise ConfigError(f"model_type is {model_type!r}, expected 'nemotron_h'", path=path, field="model_type")
        for old, new in LEGACY_KEYS.items():
            if old in raw:
                value = raw.pop(old)
                raw.setdefault(new, value)
        if raw.get("layers_block_type") is None:
            pattern = raw.get("hybrid_override_pattern")
            if pattern is None:
                raise ConfigError("neither 'layers_block_type' nor 'hybrid_override_pattern' is given", path=path,
                                  field="layers_block_type", fix="list the layer types of the model")
            unknown = sorted(set(pattern) - set(PATTERN_CHARS))
            if unknown:
                raise ConfigError(f"unknown layer character(s) {unknown} in {pattern!r}", path=path,
                                  field="hybrid_override_pattern",
                                  fix="use M (Mamba2), * (attention), - (MLP), E (MoE)")
            raw["layers_block_type"] = [PATTERN_CHARS[c] for c in pattern]
        if not isinstance(raw["layers_block_type"], list):
            raise ConfigError("must be a list of layer type names", path=path, field="layers_block_type")
        raw["layers_block_type"] = [LEGACY_LAYER_TYPES.get(t, t) for t in raw["layers_block_type"]]
        if raw.get("eos_token_id") is not None and isinstance(raw["eos_token_id"], list):
            raw["eos_token_id"] = raw["eos_token_id"][0] if raw["eos_token_id"] else None
        if "time_step_limit" in raw and raw["time_step_limit"] is not None:
            raw["time_step_limit"] = tuple(_json_float(v) for v in raw["time_step_limit"])
        elastic = raw.pop("elastic", None) or {}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: raw.pop(k) for k in list(raw) if k in names}
        if elastic.get("layer_widths") is not None:
            known["layer_widths"] = elastic["layer_widths"]
        if elastic.get("padded_widths") is not None:
            known["padded_widths"] = elastic["padded_widths"]
        if elastic.get("head_order") is not None:
            known["head_order"] = elastic["head_order"]
        for required in ("vocab_size", "hidden_size"):
            if required not in known:
                raise ConfigError("is missing", path=path, field=required, fix="add it to config.json")
        for drop in ("hybrid_override_pattern", "num_hidden_layers", "model_type", "architectures",
                     "torch_dtype", "dtype", "transformers_version"):
            raw.pop(drop, None)
        try:
            cfg = cls(**known, extra=raw)
        except ConfigError as e:
            if path is not None and e.path is None:
                raise ConfigError(str(e), path=path) from None
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid value: {e}", path=path) from None
        return cfg

    def to_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The HF `nemotron_h` config.json content (readable by transformers' NemotronHConfig)."""
        out: dict[str, Any] = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "layer_widths", "padded_widths", "head_order"):
                continue
            if f.name in MOE_FIELDS and not self.has_moe:
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["num_hidden_layers"] = self.num_hidden_layers
        out["hybrid_override_pattern"] = self.hybrid_override_pattern
        if dtype is not None:
            out["torch_dtype"] = dtype
        if self.layer_widths is not None or self.head_order != "group_contiguous":
            out["elastic"] = {"head_order": self.head_order, "layer_widths": self.layer_widths}
        if self.padded_widths is not None:  # a plain config for every reader; the real widths as a note
            out["elastic"] = {"layout": "padded", "padded_widths": self.padded_widths}
        out.update(self.extra)
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError("not found", path=path, fix="give a checkpoint directory holding config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"is not valid JSON ({e})", path=path) from None
        return cls.from_dict(raw, path=path)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def check_expert_groups(experts: int, n_group: int, bad) -> None:
    """Routed experts split over routing groups as transformers' router needs: evenly, and at least
    two per group (it ranks a group by the sum of its two best scores). ``bad(msg, fix)`` refuses."""
    if experts % n_group:
        bad(f"{experts} routed experts cannot be split evenly over n_group={n_group} routing groups",
            f"use a multiple of {n_group}")
    elif experts // n_group < 2:
        bad(f"{experts} routed experts over n_group={n_group} leave {experts // n_group} per group; transformers' "
            "router ranks each group by the sum of its two best scores", f"keep at least {2 * n_group} experts")


def _json_float(v) -> float:
    """A float from JSON, including transformers' encoding of infinities ({"__float__": "Infinity"})."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)


# ---- presets ------------------------------------------------------------------------------------

NANO_V2_12B_PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
NANO3_30B_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
SUPER3_120B_PATTERN = "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME"


def _pattern(p: str) -> list[str]:
    return [PATTERN_CHARS[c] for c in p]


PRESETS: dict[str, dict[str, Any]] = {
    # NVIDIA Nemotron Nano V2 12B, the paper's parent (12.31B parameters).
    "nemotron-nano-v2-12b": dict(
        vocab_size=131072, hidden_size=5120, layers_block_type=_pattern(NANO_V2_12B_PATTERN),
        mamba_num_heads=128, mamba_head_dim=80, n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128,
        num_attention_heads=40, num_key_value_heads=8, head_dim=128, intermediate_size=20480,
        tie_word_embeddings=False),
    # NVIDIA-Nemotron-3-Nano-30B-A3B (31,577,937,344 parameters as transformers counts them; its published
    # config.json is tests/fixtures/nemotron-3-nano-30b-a3b.config.json).
    "nemotron-3-nano-30b-a3b": dict(
        vocab_size=131072, hidden_size=2688, layers_block_type=_pattern(NANO3_30B_PATTERN),
        mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128,
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, intermediate_size=1856,
        n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, n_shared_experts=1, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=262144, tie_word_embeddings=False),
    # NVIDIA-Nemotron-3-Super-120B-A12B: latent MoE (120,668,687,360 parameters as transformers counts them,
    # its multi-token-prediction layers aside; tests/fixtures/nemotron-3-super-120b-a12b.config.json).
    "nemotron-3-super-120b-a12b": dict(
        vocab_size=131072, hidden_size=4096, layers_block_type=_pattern(SUPER3_120B_PATTERN),
        mamba_num_heads=128, mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128,
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, intermediate_size=2688,
        n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688,
        moe_shared_expert_intermediate_size=5376, n_shared_experts=1, moe_latent_size=1024,
        moe_shared_expert_overlap=False, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=5.0,
        max_position_embeddings=262144, tie_word_embeddings=False),
    # A ~5M-parameter hybrid used by benchmarks (all three layer types).
    "hybrid-5m": dict(
        vocab_size=4096, hidden_size=256, layers_block_type=_pattern("M-M*-M-M*-"),
        mamba_num_heads=16, mamba_head_dim=32, n_groups=2, ssm_state_size=32, conv_kernel=4, chunk_size=64,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=768,
        tie_word_embeddings=False),
    # A ~165M-parameter hybrid for GPU benchmarks (benchmarks/gpu_check.py): big enough that a decode
    # step moves ~330 MB of BF16 weights, small enough to build, save and load in seconds.
    "hybrid-165m": dict(
        vocab_size=32000, hidden_size=1024, layers_block_type=_pattern("M-M-M*-M-M-M*-"),
        mamba_num_heads=32, mamba_head_dim=64, n_groups=4, ssm_state_size=128, conv_kernel=4, chunk_size=128,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, intermediate_size=4096,
        tie_word_embeddings=False),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}", field="preset", fix=f"use one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
