"""Quantized checkpoints (elastic_export.qcheckpoint / qmodel / qcalib): the nested file, its slices
on disk bit for bit against quantizing the sliced float budget, the compressed-tensors layout read
by compressed-tensors itself and by transformers, the torch model against the dequantized float one."""

from __future__ import annotations

import json
import random

import pytest
import torch

import elastic_export as ee
from elastic_export import qcheckpoint as qc
from elastic_export import quant
from elastic_export.cli import main
from elastic_export.elastic import full_subnet
from elastic_export.errors import CheckpointError
from elastic_export.nested import save_nested
from elastic_export.qmodel import dequantized_model, qweight_codes
from elastic_export.slicing import slice_state
from test_quant import _family, _same


def _nested(tmp_path, cfg, seed):
    model, budgets = _family(cfg, seed)  # sorted (rank-major), three heterogeneous budgets of even widths
    src = tmp_path / "float"
    save_nested(src, model, budgets)
    return ee.load(src), src


def _tiny(seed, moe=False):
    from helpers import tiny_config, tiny_moe_config

    if moe:
        cfg = tiny_moe_config(seed, moe_intermediate_size=14, moe_shared_expert_intermediate_size=22)
        return cfg.replace(hidden_size=48, mamba_head_dim=10, head_dim=8, intermediate_size=90)
    return tiny_config(seed, hidden_size=48, mamba_head_dim=10, head_dim=8, intermediate_size=90)


CASES = [("int4", "rtn", 0, False), ("int8", "mse", 3, False), ("fp8", "rtn", 1, False), ("int4", "mse", 2, True),
         ("int8", "rtn", 1, True)]


@pytest.mark.parametrize("fmt,method,seed,moe", CASES)
def test_slices_on_disk_are_the_quantized_sliced_budgets(tmp_path, fmt, method, seed, moe):
    """quantize -> slice --budget all -> files: every budget's codes and scales equal quantizing
    that budget's float slice, bit for bit (odd sizes, rank-major heads, heterogeneous, MoE)."""
    model, src = _nested(tmp_path, _tiny(seed, moe), seed)
    spec = quant.QuantSpec(fmt, block=8, method=method, min_block=2)
    qc.quantize_nested(src, tmp_path / "q", spec)
    for uniform in (False, True):
        out = tmp_path / f"slices{uniform}"
        qc.slice_quantized_dir(tmp_path / "q", "all", out, layout="compact", uniform=uniform, echo=lambda m: None)
        plan = quant.quant_plan(model.config, {k: v for k, v in model.budgets.items() if k != "full"},
                                {k: tuple(v.shape) for k, v in model.state_dict().items()}, spec)
        for name, sub in model.budgets.items():
            got = ee.load(out / name)
            bplan = quant.budget_plan(model.config, sub, plan)
            ref = quant.quantize_state(slice_state(model, sub), bplan, spec)
            assert set(got.qweights) == set(bplan)
            gs = got.state_dict()
            for k, r in ref.items():
                if k in bplan:
                    qw = got.qweights[k]
                    assert _same(qweight_codes(qw), r[0]), (name, k)
                    b = bplan[k]
                    assert qw.block == (min(bplan.values()) if uniform else b)
                    assert torch.equal(qw.scales.repeat_interleave(qw.block, -1), r[1].repeat_interleave(b, -1))
                else:
                    assert torch.equal(gs[k], r), (name, k)


def _logits(m, ids, sub=None):
    with torch.no_grad():
        return m(ids, subnet=sub)


@pytest.mark.parametrize("fmt,tol", [("int8", 0.06), ("int4", 0.6), ("fp8", 0.3)])
def test_quantized_model_runs_every_budget_from_one_copy(tmp_path, fmt, tol):
    model, src = _nested(tmp_path, _tiny(4), 4)
    qc.quantize_nested(src, tmp_path / "q", quant.QuantSpec(fmt, block=8, min_block=2))
    qm = ee.load(tmp_path / "q")
    assert set(qm.budgets) == set(model.budgets)
    for n, p in qm.named_parameters():  # the quantized tensors hold no float copy at all
        assert p.is_meta == (n in qm.qweights), n
    ref = dequantized_model(qm)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    for name, sub in qm.budgets.items():
        q, r, f = _logits(qm, ids, sub), _logits(ref, ids, sub), _logits(model, ids, sub)
        assert (q - r).abs().max() <= 1e-5 * max(1.0, r.abs().max())
        rel = (q - f).norm() / f.norm()  # random tiny models amplify weight error: a loose bound per format
        assert rel <= tol, (name, rel)
        # the decode step (the torch engine's) against the dequantized model's, token by token
        from engines.torch_engine import TorchEngine

        eq, er = TorchEngine(qm, qm.budgets), TorchEngine(ref, ref.budgets)
        eq.set_budget(name), er.set_budget(name)
        a, b = eq.prefill(ids[:1, :7]), er.prefill(ids[:1, :7])
        for t in ids[0, 7:12]:
            a, b = eq.decode(t.view(1)), er.decode(t.view(1))
            assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max())
        assert torch.allclose(a, _logits(ref, ids[:1, :12], sub)[:, -1].reshape(a.shape), atol=1e-4)
    sm = ee.load(tmp_path / "q", budget=list(qm.budgets)[-1])  # one budget standalone (sliced codes)
    assert torch.allclose(_logits(sm, ids), _logits(qm, ids, qm.budgets[list(qm.budgets)[-1]]), atol=1e-4)


def test_shipped_model_int4_slices_read_by_transformers(tmp_path):
    """The compressed-tensors layout through the libraries: compressed-tensors' own decompressor on every
    tensor of a per-tensor-group slice, and transformers on a uniform one (one scheme for every layer)."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    qc.quantize_nested(ee.default_model_path(), tmp_path / "q", quant.QuantSpec("int4"))
    qc.slice_quantized_dir(tmp_path / "q", "75pct", tmp_path / "s", echo=lambda m: None)
    qm = ee.load(tmp_path / "s")
    ref = dequantized_model(qm)
    raw = json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"]
    assert raw["quant_method"] == "compressed-tensors" and raw["format"] == "pack-quantized"
    cfg = QuantizationConfig.model_validate(raw)
    assert {g.weights.group_size for g in cfg.config_groups.values()} == {8, 32}
    files = load_file(str(tmp_path / "s" / "model.safetensors"))
    import re

    hf_ref = {k: v for k, v in ref.state_dict().items()}
    checked = 0
    for gname, g in cfg.config_groups.items():
        comp = BaseCompressor.get_value_from_registry(g.format)
        for target in g.targets:
            pat = re.compile(target.removeprefix("re:"))
            mods = [k.removesuffix(".weight_scale") for k in files if k.endswith(".weight_scale")
                    and pat.match(k.removesuffix(".weight_scale").removeprefix("backbone."))]
            assert len(mods) == 1, target
            m = mods[0]
            sd = {k[len(m) + 1:]: v for k, v in files.items() if k.startswith(m + ".weight")}
            w = comp.decompress(sd, g)["weight"]
            assert torch.equal(w.float(), hf_ref[m + ".weight"]), m
            checked += 1
    assert checked == len(qm.qweights)

    pytest.importorskip("transformers")
    from transformers import NemotronHForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    qc.slice_quantized_dir(tmp_path / "q", "75pct", tmp_path / "u", uniform=True, echo=lambda m: None)
    hf = NemotronHForCausalLM.from_pretrained(str(tmp_path / "u"), dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(run_compressed=False))
    ids = torch.randint(0, 259, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = hf(ids).logits
    assert (a - _logits(qm.use_kernels(False), ids)).abs().max() < 1e-4  # the exact path (qkernels: bf16)


def test_older_readers_refuse_and_float_readers_refuse(tmp_path, monkeypatch):
    qc.quantize_nested(ee.default_model_path(), tmp_path / "q", quant.QuantSpec("int8"))
    mf = json.loads((tmp_path / "q" / "elastic.json").read_text())
    assert mf["format_version"] == 3 and mf["quantization"]["format"] == "int8"
    import elastic_export.nested as nested

    monkeypatch.setattr(nested, "FORMAT_VERSION", 2)  # a reader from before quantized checkpoints
    with pytest.raises(CheckpointError, match="format_version 3.*upgrade"):
        nested.read_manifest(tmp_path / "q")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="quantized weights, not float ones"):
        nested.load_nested(tmp_path / "q")
    # a truncated codes file is caught before reading
    f = tmp_path / "q" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        ee.load(tmp_path / "q")


def test_cli_quantize_slice_run(tmp_path):
    from click.testing import CliRunner

    r = CliRunner()
    res = r.invoke(main, ["quantize", "--quant", "int4", "-o", str(tmp_path / "q"), "--no-quant-embeddings"])
    assert res.exit_code == 0, res.output
    assert "blocks: 21 x 32, 4 x 8" in res.output  # embeddings kept float; out_proj at 8 (50pct: 24 channels)
    res = r.invoke(main, ["slice", str(tmp_path / "q"), "--budget", "all", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "compressed-tensors" in res.output and "written compact" in res.output
    res = r.invoke(main, ["run", str(tmp_path / "s" / "75pct"), "--prompt", "ab", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    for args, msg in ((["--method", "rtn", "--calib", "README.md"], "--calib weights"),
                      (["--block", "48"], "not a power of two"),
                      (["--min-block", "64"], "share no block of 64")):
        res = r.invoke(main, ["quantize", "--quant", "int4", "-o", str(tmp_path / "bad"), *args])
        assert res.exit_code == 2 and msg in res.output, res.output
        assert "Traceback" not in res.output and not (tmp_path / "bad").exists()


def test_input_importance_is_the_mean_squared_input(tmp_path):
    from elastic_export.qcalib import input_importance
    from core_helpers import calib_ids

    model, _ = _family(_tiny(5, moe=True), 5)
    ids = calib_ids(model.config, seed=5)
    imp = input_importance(model, ids, batch_size=3)
    with torch.no_grad():
        h = model.hidden_states(ids)  # lm_head's input, computed apart
    lm = "lm_head.weight" if model.lm_head is not None else "backbone.embeddings.weight"
    if lm == "lm_head.weight":
        assert torch.allclose(imp[lm], h.double().pow(2).mean((0, 1)).float(), rtol=1e-5)
    assert any(v.dim() == 2 for v in imp.values())  # stacked experts: one row per expert
    assert all(k in dict(model.named_parameters()) for k in imp)
    assert not any(k.endswith("conv1d.weight") for k in imp)  # a conv, not a matmul
    spec = quant.QuantSpec("int4", block=8, method="mse", min_block=2)
    sd = model.state_dict()
    plan = quant.quant_plan(model.config, {}, {k: tuple(v.shape) for k, v in sd.items()}, spec)
    qs = quant.quantize_state(sd, plan, spec, imp)  # every shape of importance fits its tensor
    assert set(qs) == set(sd)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_plan_memory_counts_the_bytes_quantize_writes(tmp_path, fmt):
    from safetensors import safe_open

    from elastic_export.accounting import memory, quantized_weight_bytes

    for seed, moe in ((2, False), (3, True)):
        model, src = _nested(tmp_path / str(seed), _tiny(seed, moe), seed)
        entry = qc.quantize_nested(src, tmp_path / f"q{seed}", quant.QuantSpec(fmt, block=8, min_block=2))
        with safe_open(tmp_path / f"q{seed}" / "model.safetensors", "pt") as f:
            on_disk = sum(f.get_tensor(k).nbytes for k in f.keys())
        cfg = model.config
        assert quantized_weight_bytes(cfg, None, fmt, entry["plan"]) == on_disk
        assert memory(cfg, None, fmt, quant_plan=entry["plan"]).weights == on_disk
        qm = ee.load(tmp_path / f"q{seed}")
        for name, sub in qm.budgets.items():  # a slice holds the budget's codes + scales + float tensors
            sm = qc.slice_model(qm, sub)
            held = sm.quantized_bytes() + sum(t.nbytes for n, t in sm.state_dict().items() if n not in sm.qweights)
            assert quantized_weight_bytes(cfg, sub, fmt, entry["plan"]) == held, name
