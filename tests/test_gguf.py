"""`build --target gguf` (elastic_export/gguf_export.py): GGUF files for llama.cpp's nemotron_h.

Always: each file read back with the gguf package's own GGUFReader (metadata, tensor names and shapes,
dequantized values against our weights within the type's rounding bound), the byte-level vocab against
transformers' GPT-2 byte map, the build directory and bad input. With a llama.cpp build
(benchmarks/llama_cpp_build.sh; ``ELASTIC_LLAMA_CPP`` or the cache path): llama.cpp loads our files and
its logits match our standalone (padded) slice run in float64, for random heterogeneous rank-major
families with odd widths and dropped layers and for the shipped model; skipped cleanly without it.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from elastic_export.build import default_model_path, load_family, verify_build
from elastic_export.cli import main
from elastic_export.elastic import LayerWidths, Subnet, full_subnet
from elastic_export.errors import ConfigError
from elastic_export.slicing import slice_budget
from elastic_export.tokenizer import ByteTokenizer
from elastic_fixtures import random_subnet, save_nested_fixture
from helpers import random_model

gguf = pytest.importorskip("gguf")
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from elastic_export import gguf_export as ge  # noqa: E402

TEXT = "Greedy bytes: Q: 7, +5, *2 = 24. Ünïcödé ✓ — tab\tand newline\n end."


def family_model(seed: int):
    """A random rank-major parent (odd sizes) and budgets: full, random widths everywhere, and one that
    also drops an MLP and a Mamba layer and has a hidden width that is whole Q8_0 blocks (64)."""
    layers = ["linear_attention", "mlp", "full_attention", "linear_attention", "mlp", "linear_attention"]
    model = random_model(seed, head_order="rank_major", layers_block_type=layers, vocab_size=300, hidden_size=72,
                         mamba_num_heads=6, mamba_head_dim=10, n_groups=2, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=12, intermediate_size=90, chunk_size=8).eval()
    cfg = model.config
    narrow = random_subnet(cfg, seed * 10 + 1, keep_all=True)
    drop = random_subnet(cfg, seed * 10 + 2, keep_all=True)
    dropped = [dataclasses.replace(w, kept=i not in (1, 5)) for i, w in enumerate(drop.layers)]
    return model, {"full": full_subnet(cfg), "narrow": narrow, "dropped": Subnet(64, tuple(dropped))}


def reference_logits(model, subnet, ids, clamp_dt: bool = True) -> torch.Tensor:
    """Our standalone padded slice of the budget in float64 (what a GGUF computes: exact for MLP and
    attention layers, the padded Mamba layers with their epsilon factors, as tests/test_padded_slices.py
    checks against transformers). ``clamp_dt=False``: without the dt clamp llama.cpp does not apply."""
    ref = slice_budget(model, subnet, layout="padded").double().eval()
    if not clamp_dt:
        for m in ref.modules():
            if hasattr(m, "dt_limit"):
                m.dt_limit = (0.0, float("inf"))
    with torch.no_grad():
        out = ref(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out)[0]


def rounded_weights_logits(model, subnet, ids) -> torch.Tensor:
    """reference_logits with every matrix rounded as a Q8_0 file stores it (Q8_0 where its rows are whole
    blocks, else F16), through the gguf package's own quantize / dequantize: what llama.cpp should compute
    but for its rounding of the activations (its Q8_0 dot products quantize them to 8 bits too)."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    p = slice_budget(model, subnet, layout="padded")
    sd = p.state_dict()
    for k, v in sd.items():
        if v.dim() == 2:  # embeddings, lm_head and every projection (conv1d is [C, 1, K])
            w = v.float().numpy()
            sd[k] = torch.from_numpy(dequantize(gguf.quants.quantize(w, q8), q8).reshape(w.shape)
                                     if w.shape[-1] % 32 == 0 else w.astype(np.float16).astype(np.float32))
    p.load_state_dict(sd)
    with torch.no_grad():
        out = p.double().eval()(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out)[0]


def _fields(r):
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


# ---- the file, read back with the gguf package ------------------------------------------------

def rounding_bound(w: np.ndarray, tname: str) -> np.ndarray:
    """Per-element bound on |dequantized - w| for ggml type ``tname`` (blocks of 32 along rows)."""
    if tname == "F32":
        return np.zeros_like(w)
    if tname in ("F16", "BF16"):
        rel = 2.0 ** -11 if tname == "F16" else 2.0 ** -8
        return np.abs(w) * rel + 6e-8
    blocks = np.abs(w).reshape(*w.shape[:-1], -1, 32).max(-1, keepdims=True)
    step = {"Q8_0": 1 / 127, "Q5_0": 1 / 16, "Q5_1": 1 / 31, "Q4_0": 1 / 8, "Q4_1": 1 / 15}[tname]
    # half a quantization step (a whole one for the asymmetric ranges), plus the f16 scale's rounding
    b = blocks * step * (1.0 if tname in ("Q4_0", "Q5_0") else 2.0) * 1.01 + 1e-7
    return np.broadcast_to(b, blocks.shape[:-1] + (32,)).reshape(w.shape)


@pytest.mark.parametrize("gtype", ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_1"])
def test_file_reads_back(tmp_path, gtype):
    model, budgets = family_model(1)
    for name, subnet in budgets.items():
        cfg, state = ge.gguf_state(model, subnet)
        path = tmp_path / f"{name}.gguf"
        ge.write_gguf(path, cfg, state, gtype, tokenizer="none")
        r = GGUFReader(str(path))
        f = _fields(r)
        kinds = cfg.layers_block_type
        assert f["general.architecture"] == "nemotron_h" and f["nemotron_h.block_count"] == len(kinds)
        assert f["nemotron_h.embedding_length"] == subnet.hidden
        # per-layer widths from the subnet itself (kept layers), not from our writer's config
        kept = [(t, w) for t, w in zip(model.config.layers_block_type, subnet.layers) if w.kept]
        assert f["nemotron_h.feed_forward_length"] == [w.ffn if t == "mlp" else 0 for t, w in kept]
        assert f["nemotron_h.attention.head_count_kv"] == [2 if t == "full_attention" else 0 for t, _ in kept]
        heads = [w.attn_heads for t, w in kept if t == "full_attention"]
        assert [h for h, (t, _) in zip(f["nemotron_h.attention.head_count"], kept) if t == "full_attention"] == heads
        H = max(w.mamba_heads for t, w in kept if t == "linear_attention")
        P = max(w.mamba_head_dim for t, w in kept if t == "linear_attention")
        assert f["nemotron_h.ssm.time_step_rank"] == H and f["nemotron_h.ssm.inner_size"] == H * P
        assert f["nemotron_h.ssm.group_count"] == 2 and f["nemotron_h.ssm.state_size"] == model.config.ssm_state_size
        assert f["nemotron_h.attention.layer_norm_rms_epsilon"] == pytest.approx(model.config.layer_norm_epsilon)
        assert f["tokenizer.ggml.model"] == "none"

        tensors = {t.name: t for t in r.tensors}
        expect = {"token_embd.weight", "output_norm.weight"} | (set() if cfg.tie_word_embeddings else {"output.weight"})
        for i, t in enumerate(kinds):
            expect.add(f"blk.{i}.attn_norm.weight")
            expect |= {"linear_attention": {f"blk.{i}.{n}" for n in ("ssm_in.weight", "ssm_conv1d.weight",
                       "ssm_conv1d.bias", "ssm_dt.bias", "ssm_a", "ssm_d", "ssm_norm.weight", "ssm_out.weight")},
                       "full_attention": {f"blk.{i}.attn_{n}.weight" for n in ("q", "k", "v", "output")},
                       "mlp": {f"blk.{i}.ffn_up.weight", f"blk.{i}.ffn_down.weight"}}[t]
        assert set(tensors) == expect
        # values: the transforms done here again, independently, from the padded HF slice
        padded = slice_budget(model, subnet, layout="padded").state_dict()
        I, G = H * P, 2
        for i, t in enumerate(kinds):
            m = f"backbone.layers.{i}.mixer."
            if t == "linear_attention":
                want = {"ssm_a": -padded[m + "A_log"].exp()[:, None], "ssm_d": padded[m + "D"][:, None],
                        "ssm_norm.weight": padded[m + "norm.weight"].reshape(G, I // G),
                        "ssm_conv1d.weight": padded[m + "conv1d.weight"][:, 0], "ssm_in.weight": padded[m + "in_proj.weight"],
                        "ssm_dt.bias": padded[m + "dt_bias"], "ssm_out.weight": padded[m + "out_proj.weight"]}
            elif t == "full_attention":  # our compact widths: no padding in the file
                want = {"attn_q.weight": state[m + "q_proj.weight"], "attn_output.weight": state[m + "o_proj.weight"]}
                assert want["attn_q.weight"].shape[0] == kept[i][1].attn_heads * 12
            else:
                want = {"ffn_up.weight": state[m + "up_proj.weight"], "ffn_down.weight": state[m + "down_proj.weight"]}
                assert want["ffn_up.weight"].shape[0] == kept[i][1].ffn
            want = {"token_embd.weight": state["backbone.embeddings.weight"], **{f"blk.{i}.{k}": v for k, v in want.items()}}
            for tname, w in want.items():
                w = w.detach().float().numpy()
                t_ = tensors[tname]
                got = dequantize(t_.data, t_.tensor_type).reshape(w.shape)
                kind = t_.tensor_type.name
                if w.ndim == 1 or tname.split(".")[-1] in ("ssm_a", "ssm_d") or "conv1d" in tname or "norm" in tname:
                    assert kind == "F32", tname
                else:
                    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ge.TYPES[gtype][0]]][0]
                    assert kind == (ge.TYPES[gtype][0] if w.shape[-1] % block == 0 else "F16"), tname
                err = np.abs(got - w)
                assert (err <= rounding_bound(w, kind)).all(), (tname, kind, err.max())


def test_byte_vocab_is_gpt2_byte_level(tmp_path):
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's map, independently

    assert ge.byte_unicode() == bytes_to_unicode()
    model, fam, _ = load_family(None)
    cfg, state = ge.gguf_state(model, fam["50pct"])
    ge.write_gguf(tmp_path / "m.gguf", cfg, state, "q8_0", tokenizer="byte_level")
    f = _fields(GGUFReader(str(tmp_path / "m.gguf")))
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    inv = {c: b for b, c in bytes_to_unicode().items()}
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert bytes(inv[tokens[i]] for i in ids).decode() == TEXT  # every byte id spells its byte
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert f["tokenizer.ggml.model"] == "gpt2" and len(tokens) == cfg.vocab_size


def test_refuses_what_llama_cpp_cannot_run():
    model, budgets = family_model(2)
    cfg = model.config
    no_attn = Subnet(cfg.hidden_size, tuple(dataclasses.replace(w, kept=t != "full_attention")
                                            for t, w in zip(cfg.layers_block_type, full_subnet(cfg).layers)))
    c, s = ge.gguf_state(model, no_attn)
    with pytest.raises(ConfigError, match="at least one attention layer"):
        ge.layer_metadata(c)
    with pytest.raises(ConfigError, match="relu2"):
        ge.check_supported(cfg.replace(mlp_hidden_act="silu"))
    with pytest.raises(ConfigError, match="unknown GGUF type"):
        ge.check_types(["q3_k"])
    from helpers import tiny_moe_config
    with pytest.raises(ConfigError, match="MoE layers") as e:
        ge.check_supported(tiny_moe_config(1))
    assert e.value.field == "layers_block_type"


def test_cli_build_writes_every_budget_and_type(tmp_path):
    model, budgets = family_model(3)
    save_nested_fixture(tmp_path / "ck", model, budgets)
    out = tmp_path / "g"
    r = CliRunner().invoke(main, ["build", str(tmp_path / "ck"), "--target", "gguf", "--gguf-type", "f32",
                                  "--gguf-type", "q8_0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "build.json").read_text())
    assert m["target"] == "gguf" and m["gguf_types"] == ["f32", "q8_0"] and sorted(m["budgets"]) == sorted(budgets)
    assert sorted(m["files"]) == sorted(f"{n}.{t}.gguf" for n in budgets for t in ("f32", "q8_0"))
    verify_build(out)
    assert m["budgets"]["full"]["mamba_eps_factors"] == {}
    # a padded Mamba layer is recorded with k = n_pad / n (elastic_export/padding.py)
    for n, rec in m["budgets"].items():
        s = budgets[n]
        kept = [w for t, w in zip(model.config.layers_block_type, s.layers) if w.kept]
        widths = [w.mamba_heads * w.mamba_head_dim if w.mamba_heads else None for w in kept]
        H = max(w.mamba_heads for w in kept if w.mamba_heads)
        P = max(w.mamba_head_dim for w in kept if w.mamba_heads)
        assert rec["mamba_eps_factors"] == {str(i): pytest.approx(H * P / n_) for i, n_ in enumerate(widths)
                                            if n_ is not None and n_ < H * P}
    r = CliRunner().invoke(main, ["run", str(out), "--prompt", "x"])
    assert r.exit_code == 2 and "llama.cpp" in r.output
    r = CliRunner().invoke(main, ["build", str(tmp_path / "ck"), "--target", "gguf", "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output


# ---- llama.cpp itself (skipped without a build) ---------------------------------------------

def _llama():
    from engines import llama_cpp

    ok, why = llama_cpp.available()
    if not ok:
        pytest.skip(why)
    return llama_cpp


@pytest.mark.parametrize("seed", [4, 5])
def test_llama_cpp_matches_random_family(tmp_path, seed):
    lc = _llama()
    model, budgets = family_model(seed)
    ids = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(seed)).tolist()
    for name, subnet in budgets.items():
        cfg, state = ge.gguf_state(model, subnet)
        ref = reference_logits(model, subnet, ids)
        for gtype in ("f32", "q8_0"):
            ge.write_gguf(tmp_path / f"{name}.{gtype}.gguf", cfg, state, gtype, tokenizer="none")
            lm = lc.LlamaCpp(tmp_path / f"{name}.{gtype}.gguf", threads=1, n_ctx=64)
            got = torch.from_numpy(lm.logits(ids)).double()
            err = (got - ref).abs().max().item()
            if gtype == "f32":
                assert err < 2e-5 * max(1.0, ref.abs().max().item()), (name, err)
                toks, _, _ = lm.generate(ids[:10], 10)  # one-token decode steps through llama.cpp's caches
                padded = slice_budget(model, subnet, layout="padded").double().eval()  # the file's function
                want = padded.generate(torch.tensor([ids[:10]]), 10)[0, 10:].tolist()
                assert toks == want, name
            else:  # the weights' rounding moves a random budget's logits by up to ~4% of their range (it is
                # chaotic); llama.cpp's 8-bit activations add about as much again
                rq = rounded_weights_logits(model, subnet, ids)
                assert (got - rq).abs().max().item() < 0.05 * rq.abs().max().item(), (name, (got - rq).abs().max())
                assert (got.argmax(-1) == rq.argmax(-1)).double().mean() >= 0.9, name
            lm.close()


def test_llama_cpp_matches_shipped_model(tmp_path):
    lc = _llama()
    out = tmp_path / "g"
    r = CliRunner().invoke(main, ["build", "--target", "gguf", "--gguf-type", "f32", "--gguf-type", "q8_0",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    model, fam, _ = load_family(default_model_path())
    tok = ByteTokenizer()
    ids = tok.encode(TEXT, add_bos=True)
    for name, subnet in fam.items():
        ref = reference_logits(model, subnet, ids, clamp_dt=False)
        f32 = lc.LlamaCpp(out / f"{name}.f32.gguf", threads=1, n_ctx=256)
        assert f32.tokenize(TEXT, add_special=True) == ids  # llama.cpp's BPE gives our byte ids, BOS first
        assert f32.detokenize(ids[1:]) == TEXT
        got = torch.from_numpy(f32.logits(ids)).double()
        assert (got - ref).abs().max().item() < 1e-4, name
        q8 = lc.LlamaCpp(out / f"{name}.q8_0.gguf", threads=1, n_ctx=256)
        got = torch.from_numpy(q8.logits(ids)).double()
        assert (got - ref).abs().max().item() < 0.5 and (got.argmax(-1) == ref.argmax(-1)).double().mean() > 0.95
        f32.close(), q8.close()
