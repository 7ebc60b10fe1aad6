"""`elastic-export build --target gguf`: one GGUF file per budget (and type) for llama.cpp, Ollama, LM Studio.

Written with the `gguf` package (the llama.cpp project's own writer, imported only here and only when
asked for) in llama.cpp's ``nemotron_h`` architecture. Tensor names, metadata keys and transforms follow
llama.cpp's converter (``conversion/nemotron.py`` and ``mamba.py`` of the llama.cpp vendored in
llama-cpp-python 0.3.36) and its loader (``src/models/nemotron-h.cpp``, ``mamba-base.cpp``):

    backbone.embeddings / norm_f / lm_head   token_embd / output_norm / output (absent when tied)
    layers.i.norm                            blk.i.attn_norm (every block's pre-norm)
    mixer.in_proj [2I + 2GN + H, D]          blk.i.ssm_in        # rows [z | x | B | C | dt]
    mixer.conv1d [C, 1, K] (+ bias)          blk.i.ssm_conv1d [C, K]
    mixer.dt_bias [H]                        blk.i.ssm_dt.bias
    mixer.A_log [H]                          blk.i.ssm_a [H, 1]  = -exp(A_log)
    mixer.D [H]                              blk.i.ssm_d [H, 1]
    mixer.norm [I]                           blk.i.ssm_norm [G, I / G]   (the gated RMSNorm's groups)
    mixer.out_proj, q/k/v/o_proj, up/down    ssm_out, attn_q/k/v/output, ffn_up/down

Layer types are told apart by per-layer metadata arrays (llama.cpp: a layer is Mamba iff its
``head_count_kv`` and ``feed_forward_length`` are both 0): ``feed_forward_length`` is an MLP layer's
width, ``head_count`` / ``head_count_kv`` an attention layer's query / KV heads.

Heterogeneous budgets. Those two arrays carry per-layer widths, so MLP and attention layers keep their own
widths (exact, nothing padded). llama.cpp's Mamba2 layer takes ``ssm.inner_size`` and
``ssm.time_step_rank`` (the head count) from scalars, so Mamba layers are written in the padded layout of
:mod:`elastic_export.padding` at the budget's widest Mamba width: exact at that width, the budget with
its gated-norm epsilon times ``k = n_pad / n`` where narrower (:func:`elastic_export.padding.eps_factors`,
recorded in build.json per budget).

What llama.cpp cannot express, and we therefore refuse or state: in_proj / out_proj biases (no tensor
for them), activations other than relu2 (MLP) and SiLU (conv), and the lower clamp of dt at
``time_step_min`` that our model and transformers' prefill apply (llama.cpp's ``ssm_scan`` uses
softplus(dt + dt_bias) unclamped: logits differ wherever a trained model's dt falls below it).

Tokenizer. Our byte-level tokenizer (0 pad, 1 bos, 2 eos, 3 + b for byte b) becomes a GPT-2 style
byte-level BPE vocab with no real merges: each byte token's text is GPT-2's printable character for the
byte, so llama.cpp's BPE splits any text into exactly our byte ids and detokenizes them back. A source
without a tokenizer gets llama.cpp's ``none`` vocab (token ids in, logits out).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, ConfigError

ARCH = "nemotron_h"
# --gguf-type -> (ggml tensor type of the matrices, llama.cpp file type); names as llama.cpp spells them
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
         "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
FALLBACK = "F16"  # a matrix whose rows are not whole quantization blocks (llama.cpp's converter does the same)


def require_gguf():
    """The `gguf` package, or a ConfigError saying how to get it."""
    try:
        import gguf
    except ImportError:
        raise ConfigError("the GGUF target needs the `gguf` package (llama.cpp's writer)", field="target",
                          fix="pip install gguf (or pip install 'elastic-export[gguf]')") from None
    return gguf


def check_types(types) -> list[str]:
    types = [t.lower() for t in (types or ("f32",))]
    bad = [t for t in types if t not in TYPES]
    if bad:
        raise ConfigError(f"unknown GGUF type {bad[0]!r}", field="gguf_type", fix=f"use one of {', '.join(TYPES)}")
    return list(dict.fromkeys(types))


def check_supported(cfg) -> None:
    """Refuse what llama.cpp's nemotron_h graph does not compute (it would load and give wrong logits)."""
    if cfg.has_moe:  # llama.cpp has nemotron_h_moe; our writer does not produce it yet
        raise ConfigError("MoE layers (Nemotron 3) are not written by the GGUF target yet (llama.cpp's "
                          "nemotron_h_moe architecture)", field="layers_block_type",
                          fix="build --target onnx for this model")
    if cfg.mlp_hidden_act != "relu2":
        raise ConfigError(f"llama.cpp's nemotron_h MLP is relu2, not {cfg.mlp_hidden_act!r}", field="mlp_hidden_act")
    if cfg.mamba_hidden_act != "silu":
        raise ConfigError(f"llama.cpp's nemotron_h conv activation is SiLU, not {cfg.mamba_hidden_act!r}",
                          field="mamba_hidden_act")
    if cfg.mamba_proj_bias or cfg.attention_bias:
        raise ConfigError("llama.cpp's nemotron_h has no in_proj / out_proj / q, k, v, o biases",
                          field="mamba_proj_bias" if cfg.mamba_proj_bias else "attention_bias",
                          fix="build --target onnx for this model")


# ---- the weights of one budget ----------------------------------------------------------------

@torch.no_grad()
def gguf_state(model, subnet) -> tuple:
    """(config, state) of one budget as llama.cpp reads it: the compact slice (kept layers, HF key names,
    group-contiguous heads; ``config.layer_widths`` per layer when heterogeneous) with only its Mamba
    layers padded to the widest Mamba width (see the module docstring)."""
    from .padding import pad_state
    from .slicing import sliced_config, slice_state

    cfg, state = sliced_config(model.config, subnet), slice_state(model, subnet)
    if cfg.layer_widths is None:
        return cfg, state
    padded = pad_state(cfg, state)
    mamba = {f"backbone.layers.{i}.mixer." for i, t in enumerate(cfg.layers_block_type) if t == "linear_attention"}
    return cfg, {k: (padded[k] if any(k.startswith(m) for m in mamba) else v) for k, v in state.items()}


def layer_metadata(cfg) -> dict[str, list[int]]:
    """Per-layer arrays: feed_forward_length (MLP width, else 0), head_count_kv (attention, else 0) and
    head_count (attention's query heads; the widest elsewhere, since llama.cpp reads layer 0's as the
    model's and ignores it in non-attention layers). llama.cpp aborts on a model without an attention
    or without a Mamba layer, so those are refused here."""
    kinds = cfg.layers_block_type
    for t, what in (("full_attention", "attention"), ("linear_attention", "Mamba")):
        if t not in kinds:  # its hybrid memory then has an empty KV or state buffer: GGML_ASSERT(buffer)
            raise ConfigError(f"llama.cpp's nemotron_h needs at least one {what} layer; this budget keeps none",
                              field="layers_block_type", fix="keep one such layer in the budget, or build --target onnx")
    attn = [cfg.layer_dims(i)["num_attention_heads"] for i, t in enumerate(kinds) if t == "full_attention"]
    wide = max(attn, default=cfg.num_attention_heads)
    ff, heads, kv = [], [], []
    for i, t in enumerate(kinds):
        d = cfg.layer_dims(i)
        ff.append(d["intermediate_size"] if t == "mlp" else 0)
        heads.append(d["num_attention_heads"] if t == "full_attention" else wide)
        kv.append(cfg.num_key_value_heads if t == "full_attention" else 0)
    if any(t == "mlp" and f <= 0 for t, f in zip(kinds, ff)):
        raise ConfigError("an MLP layer of width 0 would read as a Mamba layer in llama.cpp",
                          field="intermediate_size", fix="drop the layer from the budget instead")
    return {"feed_forward_length": ff, "head_count": heads, "head_count_kv": kv}


def gguf_tensors(cfg, state: dict[str, torch.Tensor]) -> list[tuple[str, np.ndarray, bool]]:
    """(GGUF name, float32 array in torch's row-major shape, is a matrix the file type applies to), in
    llama.cpp's order; the transforms of the module docstring."""
    gguf = require_gguf()
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    G = cfg.n_groups

    def f32(t):
        return t.detach().to(torch.float32).contiguous().numpy()

    def name(kind, i=None, suffix=".weight"):
        return names[kind].format(bid=i) + suffix

    out = [(name(T.TOKEN_EMBD), f32(state["backbone.embeddings.weight"]), True)]
    mixer = {  # HF suffix -> (tensor, gguf suffix, transform, is a matrix)
        "in_proj.weight": (T.SSM_IN, ".weight", None, True),
        "conv1d.weight": (T.SSM_CONV1D, ".weight", lambda t: t.squeeze(1), False),  # [C, 1, K] -> [C, K]
        "conv1d.bias": (T.SSM_CONV1D, ".bias", None, False),
        "dt_bias": (T.SSM_DT, ".bias", None, False),
        "A_log": (T.SSM_A, "", lambda t: -torch.exp(t.float())[:, None], False),  # A = -exp(A_log) [H, 1]
        "D": (T.SSM_D, "", lambda t: t[:, None], False),  # [H, 1]
        "norm.weight": (T.SSM_NORM, ".weight", lambda t: t.reshape(G, -1), False),  # [G, I / G]
        "out_proj.weight": (T.SSM_OUT, ".weight", None, True),
        "q_proj.weight": (T.ATTN_Q, ".weight", None, True), "k_proj.weight": (T.ATTN_K, ".weight", None, True),
        "v_proj.weight": (T.ATTN_V, ".weight", None, True), "o_proj.weight": (T.ATTN_OUT, ".weight", None, True),
        "up_proj.weight": (T.FFN_UP, ".weight", None, True), "up_proj.bias": (T.FFN_UP, ".bias", None, False),
        "down_proj.weight": (T.FFN_DOWN, ".weight", None, True),
        "down_proj.bias": (T.FFN_DOWN, ".bias", None, False),
    }
    for i in range(cfg.num_hidden_layers):
        pre = f"backbone.layers.{i}."
        out.append((name(T.ATTN_NORM, i), f32(state[pre + "norm.weight"]), False))
        for key in [k for k in state if k.startswith(pre + "mixer.")]:
            short = key[len(pre + "mixer."):]
            if short not in mixer:
                raise ConfigError(f"llama.cpp's nemotron_h has no tensor for {key}", field=key,
                                  fix="build --target onnx for this model")
            kind, suffix, fn, matrix = mixer[short]
            t = state[key]
            out.append((name(kind, i, suffix), f32(fn(t) if fn else t), matrix))
    out.append((name(T.OUTPUT_NORM), f32(state["backbone.norm_f.weight"]), False))
    if "lm_head.weight" in state and not cfg.tie_word_embeddings:
        out.append((name(T.OUTPUT), f32(state["lm_head.weight"]), True))
    return out


def encode_tensor(arr: np.ndarray, qtype_name: str, matrix: bool) -> tuple[np.ndarray, str]:
    """(data, ggml type name): vectors, norms, conv and SSM parameters stay float32; matrices take
    ``qtype_name``, or F16 where a row is not whole quantization blocks."""
    gguf = require_gguf()
    if not matrix or qtype_name == "F32":
        return arr.astype(np.float32), "F32"
    qt = gguf.GGMLQuantizationType[qtype_name]
    block = gguf.GGML_QUANT_SIZES[qt][0]
    if arr.shape[-1] % block:
        qt = gguf.GGMLQuantizationType[FALLBACK]
    return gguf.quants.quantize(arr, qt), qt.name


# ---- the tokenizer ----------------------------------------------------------------------------

def byte_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE writes every byte as one character)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = dict(zip(keep, keep)), 0
    for b in range(256):
        if b not in chars:
            chars[b], n = 256 + n, n + 1
    return {b: chr(c) for b, c in chars.items()}


def tokenizer_kind(tok_dir: Path | None) -> str:
    """``byte_level`` (our own description, preferred), or ``none`` (no tokenizer); ConfigError otherwise."""
    if tok_dir is None:
        return "none"
    if (Path(tok_dir) / "byte_level.json").is_file():
        return "byte_level"
    raise ConfigError("holds a tokenizer the GGUF target cannot convert yet (only our byte-level one)",
                      path=tok_dir, fix="convert its tokenizer with llama.cpp's convert_hf_to_gguf.py, "
                                        "or remove tokenizer/ to write a GGUF without a vocab")


def write_vocab(w, kind: str, cfg) -> None:
    gguf = require_gguf()
    if kind == "none":
        w.add_tokenizer_model("none")  # llama.cpp makes vocab_size placeholder tokens
        return
    from .tokenizer import ByteTokenizer, OFFSET

    bt = ByteTokenizer()
    if cfg.vocab_size < bt.vocab_size:
        raise ConfigError(f"vocab_size {cfg.vocab_size} is smaller than the byte-level tokenizer's {bt.vocab_size}",
                          field="vocab_size")
    to_char = byte_unicode()
    special = {bt.pad_token_id: "<pad>", bt.bos_token_id: "<s>", bt.eos_token_id: "</s>"}
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i in special:
            tokens.append(special[i]), types.append(gguf.TokenType.CONTROL)
        elif OFFSET <= i < OFFSET + 256:
            tokens.append(to_char[i - OFFSET]), types.append(gguf.TokenType.NORMAL)
        else:  # model rows beyond the tokenizer
            tokens.append(f"[PAD{i}]"), types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    # No merges: every token is one byte. llama.cpp requires the merges key and the gguf package writes no
    # empty array, so the list holds one merge of two control-token texts, which never occur as symbols of
    # a word (those are single characters) and so never apply.
    w.add_token_merges([f"{special[bt.bos_token_id]} {special[bt.eos_token_id]}"])
    w.add_bos_token_id(bt.bos_token_id)
    w.add_eos_token_id(bt.eos_token_id)
    w.add_pad_token_id(bt.pad_token_id)
    w.add_add_bos_token(True)  # as `elastic-export run` encodes a prompt
    w.add_add_eos_token(False)


# ---- one file ---------------------------------------------------------------------------------

def write_gguf(path: str | Path, cfg, state: dict[str, torch.Tensor], gguf_type: str = "f32",
               tokenizer: str = "none", name: str = "elastic-export") -> dict:
    """Write one GGUF file; returns {tensors: count per ggml type}."""
    gguf = require_gguf()
    check_supported(cfg)
    qname, ftype = TYPES[check_types([gguf_type])[0]]
    meta = layer_metadata(cfg)
    H, P = cfg.mamba_num_heads, cfg.mamba_head_dim
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType[ftype])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(meta["feed_forward_length"])
    w.add_head_count(meta["head_count"])
    w.add_head_count_kv(meta["head_count_kv"])
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    w.add_ssm_conv_kernel(cfg.conv_kernel)
    w.add_ssm_inner_size(H * P)
    w.add_ssm_state_size(cfg.ssm_state_size)
    w.add_ssm_time_step_rank(H)  # llama.cpp reads the Mamba2 head count from this key
    w.add_ssm_group_count(cfg.n_groups)
    w.add_vocab_size(cfg.vocab_size)
    write_vocab(w, tokenizer, cfg)
    counts: dict[str, int] = {}
    for tname, arr, matrix in gguf_tensors(cfg, state):
        data, tt = encode_tensor(arr, qname, matrix)
        w.add_tensor(tname, data, raw_dtype=gguf.GGMLQuantizationType[tt])
        counts[tt] = counts.get(tt, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensors": counts}


# ---- the build directory ----------------------------------------------------------------------

def build_gguf(source, out, budgets=("all",), gguf_types=("f32",), overwrite: bool = False, progress=None,
               **_ignored) -> Path:
    """Build ``out``: ``{budget}.{type}.gguf`` for every budget and type, and build.json (target ``gguf``,
    files with their SHA-256, per budget its subnet, files and the padded Mamba layers' epsilon factors)."""
    from .build import BUILD_FORMAT, BUILD_VERSION, load_family, select_budgets, source_record
    from .hf_io import atomic_dir
    from .nested import sha256_file
    from .padding import eps_factors

    require_gguf()
    types = check_types(gguf_types)
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError("already exists", path=out, fix="choose another --out or pass --overwrite")
    model, family, src = load_family(source)
    check_supported(model.config)
    chosen = select_budgets(family, list(budgets))
    tok_dir = src / "tokenizer" if (src / "tokenizer").is_dir() else None
    tok = tokenizer_kind(tok_dir)
    record, files = {}, {}
    with atomic_dir(out) as tmp:
        for n, subnet in chosen.items():
            cfg, state = gguf_state(model, subnet)
            k = eps_factors(cfg)
            record[n] = {"subnet": subnet.to_dict(), "files": {},
                         "mamba_eps_factors": {str(i): f for i, f in k.items()}}
            for t in types:
                fname = f"{n}.{t}.gguf"
                info = write_gguf(tmp / fname, cfg, state, t, tokenizer=tok, name=f"elastic-export {n}")
                files[fname] = {"sha256": sha256_file(tmp / fname), "bytes": (tmp / fname).stat().st_size}
                record[n]["files"][t] = fname
                if progress:
                    progress(f"{fname}: {files[fname]['bytes'] / 1e6:.1f} MB, tensors {info['tensors']}")
            if progress and k:
                progress(f"  note: {n}: padded Mamba layers {', '.join(f'{i} (x{f:.3g})' for i, f in k.items())} run "
                         "with their gated-norm epsilon multiplied as shown (llama.cpp has one Mamba width; see "
                         "elastic_export/padding.py)")
        manifest = {
            "format": BUILD_FORMAT, "version": BUILD_VERSION, "target": "gguf", "ssm_op": None,
            "dtype": ",".join(types), "gguf_types": types, "architecture": ARCH, "source": source_record(src),
            "config": model.config.to_dict(), "budgets": record, "files": files, "tokenizer": tok,
            "notes": ["llama.cpp computes dt = softplus(dt + dt_bias) without the clamp at time_step_min that "
                      f"our model applies ({model.config.time_step_min:g}); logits differ where dt falls below it"],
        }
        (tmp / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
