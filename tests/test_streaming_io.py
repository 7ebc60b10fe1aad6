"""Streaming I/O (issue 13 item 1): the memory-mapped reader, the streaming writer and the slice
written tensor by tensor, each against an independent reference: safetensors' own save_file and
safe_open, and the in-memory path of before (kept here: whole state dicts, save_file)."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import elastic_export as ee
from elastic_export.elastic import full_subnet
from elastic_export.errors import CheckpointError
from elastic_export.hf_io import INDEX, LM_HEAD, SINGLE, cast, load, split_experts
from elastic_export.importance import compute_importance
from elastic_export.nested import load_nested, save_nested
from elastic_export.safetensors_io import SafetensorsFile, read_header, save_tensors, write_file
from elastic_export.slicing import save_slice, slice_budget
from elastic_export.sorting import sort_model
from core_helpers import calib_ids
from elastic_fixtures import random_subnet
from helpers import randomize, random_model, tiny_moe_config

BF16 = torch.bfloat16


# ---- the reference: the in-memory path before issue 13 --------------------------------------------

def old_write(state, directory, max_shard_bytes=None):
    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, str(directory / SINGLE), metadata=meta)
        return
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2) + "\n")


def old_save_pretrained(model, path, dtype=None, max_shard_bytes=None, expert_layout="per_expert"):
    if model.config.head_order != "group_contiguous":
        model = slice_budget(model, full_subnet(model.config))
    sd = model.state_dict()
    if model.lm_head is None:
        sd[LM_HEAD] = sd["backbone.embeddings.weight"].clone()
    state = {n: cast(n, t.detach(), dtype).contiguous().cpu() for n, t in sd.items()}
    if expert_layout == "per_expert":
        state = split_experts(state)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(model.config.to_dict(
        str(state["backbone.embeddings.weight"].dtype).removeprefix("torch.")), indent=2) + "\n")
    old_write(state, path, max_shard_bytes)


def same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if (a / n).is_file():
            assert (a / n).read_bytes() == (b / n).read_bytes(), n


def _sorted(model, seed=0):
    imp = compute_importance(model.eval(), calib_ids(model.config, 3, 11, seed), batch_size=2, depth="none")
    return sort_model(model, imp)[0].eval()


def _moe(seed, dtype=torch.float32):
    return randomize(ee.build_model(tiny_moe_config(seed), seed=seed), seed).to(dtype)


# ---- the writer ---------------------------------------------------------------------------------

ODD = {"b.w": torch.randn(3, 5).to(BF16), "a.x": torch.randn(2, 7), "c": torch.arange(3), "d": torch.zeros(0, 5,
       dtype=torch.float16), "e": torch.tensor(True), "f": torch.arange(5, dtype=torch.uint8), "g": torch.randn(2,
       dtype=torch.float64), "h": torch.arange(3, dtype=torch.int32), "i": torch.arange(3, dtype=torch.int8),
       "j": torch.arange(2, dtype=torch.int16), "k": torch.randn(3).to(torch.float8_e4m3fn), "scalar": torch.tensor(2.5),
       "z.\u00e9": torch.ones(1)}


@pytest.mark.parametrize("meta", [None, {"format": "pt"}])
def test_writer_bytes_equal_save_file(tmp_path, meta):
    save_file(ODD, str(tmp_path / "ref.st"), metadata=meta)
    save_tensors(tmp_path / "ours.st", ODD, meta)
    assert (tmp_path / "ours.st").read_bytes() == (tmp_path / "ref.st").read_bytes()
    with safe_open(str(tmp_path / "ours.st"), "pt") as sf:
        assert set(sf.keys()) == set(ODD) and (sf.metadata() or None) == meta
        for k in ODD:
            assert torch.equal(_bytes(sf.get_tensor(k)), _bytes(ODD[k])), k
    f = SafetensorsFile(tmp_path / "ours.st")
    for k in ODD:
        got = f.tensor(k)
        assert got.dtype == ODD[k].dtype and got.shape == ODD[k].shape and torch.equal(_bytes(got), _bytes(ODD[k]))


def _bytes(t):
    return t.reshape(-1).view(torch.uint8)


def test_writer_makes_one_tensor_at_a_time_and_refuses_a_wrong_one(tmp_path):
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in ODD.items()}
    made = []

    def produce(name):
        made.append(name)
        return ODD[name]

    write_file(tmp_path / "a.st", specs, produce, after=lambda n: made.append(f"after {n}"))
    assert made[::2] == list(read_header(tmp_path / "a.st")[0]) and made[1::2] == [f"after {n}" for n in made[::2]]
    with pytest.raises(ValueError, match="declared"):
        write_file(tmp_path / "b.st", specs, lambda n: ODD[n].float() if n == "c" else ODD[n])
    assert not (tmp_path / "b.st").exists()


# ---- the reader: header validation --------------------------------------------------------------

def _raw(header: dict, data: bytes, data_at: int = 0) -> bytes:
    """A file whose data starts at a multiple of 8 (as save_file pads), or ``data_at`` mod 8."""
    h = json.dumps(header).encode()
    h += b" " * ((data_at - 8 - len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("kind,expect", [
    ("short", "shorter than the 8-byte header length"), ("long_header", "exceeds the file"),
    ("not_json", "not JSON"), ("dtype", "unknown dtype 'Q7'"), ("shape", "hold 8 bytes, its dtype and shape"),
    ("gap", "a gap or an overlap"), ("trailing", "the tensors end at byte"), ("offsets", "malformed"),
    ("truncated", "the tensors end at byte")])
def test_bad_headers_are_refused_naming_the_file(tmp_path, kind, expect):
    f = tmp_path / "w.safetensors"
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    data = bytes(8)
    raw = {"short": b"\x01\x02", "long_header": struct.pack("<Q", 1 << 20) + b"{}",
           "not_json": struct.pack("<Q", 8) + b"{nope!!!" + data,
           "dtype": _raw({"a": {**ok["a"], "dtype": "Q7"}}, data),
           "shape": _raw({"a": {**ok["a"], "shape": [3]}}, data),
           "gap": _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, data),
           "trailing": _raw(ok, data + b"xx"), "offsets": _raw({"a": {**ok["a"], "data_offsets": [0]}}, data),
           "truncated": _raw(ok, data)[:-3]}[kind]
    f.write_bytes(raw)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        SafetensorsFile(f)
    assert expect in str(e.value) and str(f) in str(e.value)


def test_unaligned_tensors_of_another_writer_are_read(tmp_path):
    """A header not padded to 8 bytes puts data at odd offsets: those tensors are copied, not viewed."""
    t = torch.randn(3)
    f = tmp_path / "odd.safetensors"
    f.write_bytes(_raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}, t.numpy().tobytes(), 3))
    assert read_header(f)[0]["a"].begin % 4 == 3
    got = SafetensorsFile(f).tensor("a")
    assert torch.equal(got, t) and got.data_ptr() % 4 == 0


# ---- load: memory-mapped, same model as before ------------------------------------------------------

@pytest.mark.parametrize("seed,dtype,shard,layout", [(0, torch.float32, None, "per_expert"),
                                                     (1, BF16, 3000, "per_expert"), (2, BF16, None, "stacked"),
                                                     (3, torch.float32, 5000, "stacked")])
def test_moe_checkpoints_write_as_before_and_load_back(tmp_path, seed, dtype, shard, layout):
    m = _moe(seed, dtype)
    ee.hf_io.save_pretrained(m, tmp_path / "new", max_shard_bytes=shard, expert_layout=layout)
    old_save_pretrained(m, tmp_path / "old", max_shard_bytes=shard, expert_layout=layout)
    same_files(tmp_path / "new", tmp_path / "old")
    back = load(tmp_path / "new")
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    f32 = load(tmp_path / "new", dtype="float32")
    assert f32.dtype == torch.float32 and f32.backbone.layers[0].norm.weight.dtype == torch.float32


@pytest.mark.parametrize("seed,tied,dtype,shard", [(0, True, None, None), (1, False, BF16, 20_000),
                                                   (2, True, BF16, 7_000), (3, False, None, None)])
def test_dense_save_and_load_equal_the_in_memory_path(tmp_path, seed, tied, dtype, shard):
    m = random_model(seed, tie_word_embeddings=tied)
    m.save_pretrained(tmp_path / "new", dtype=dtype, max_shard_bytes=shard)
    old_save_pretrained(m, tmp_path / "old", dtype=dtype, max_shard_bytes=shard)
    same_files(tmp_path / "new", tmp_path / "old")
    back = load(tmp_path / "new")
    ref = m.to(dtype) if dtype else m
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k] if k in ref.state_dict() else ref.lm_head_weight), k


def test_loaded_weights_are_views_of_the_file(tmp_path):
    """Copy-on-write: a loaded model may be trained in place, the file never changes; a read-only
    load may drop its pages and read them again."""
    m = random_model(4, dtype=BF16)
    m.save_pretrained(tmp_path / "c")
    before = (tmp_path / "c" / SINGLE).read_bytes()
    back = load(tmp_path / "c")
    w = back.backbone.embeddings.weight
    storage = w.untyped_storage()
    assert storage.nbytes() == w.numel() * 2  # the tensor's own bytes of the map, no private buffer
    with torch.no_grad():
        w.add_(1)
    assert (tmp_path / "c" / SINGLE).read_bytes() == before
    assert torch.equal(load(tmp_path / "c").backbone.embeddings.weight, m.backbone.embeddings.weight)
    sorted_m = _sorted(random_model(5))
    save_nested(tmp_path / "n", sorted_m, {})
    ro = load_nested(tmp_path / "n", writable=False)
    ref = {k: v.clone() for k, v in ro.model.state_dict().items()}
    ro.drop_pages()
    assert all(torch.equal(v, ref[k]) for k, v in ro.model.state_dict().items())
    with pytest.raises(ValueError, match="read-only"):
        load_nested(tmp_path / "n").drop_pages()


# ---- slice, tensor by tensor ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,seed,layout,dtype", [("dense", 0, "compact", None), ("dense", 1, "padded", BF16),
                                                    ("dense", 2, "padded", None), ("moe", 3, "compact", BF16),
                                                    ("moe", 4, "padded", None), ("dense", 5, "compact", BF16)])
def test_streamed_slice_bytes_equal_the_in_memory_slice(tmp_path, kind, seed, layout, dtype):
    parent = _moe(seed) if kind == "moe" else random_model(seed, tie_word_embeddings=seed % 2 == 0)
    s = _sorted(parent, seed)
    rng = random.Random(seed)
    for k in range(3):
        sub = full_subnet(s.config) if k == 0 else random_subnet(s.config, rng.randint(0, 999), keep_all=k == 2)
        if kind == "moe" and layout == "padded":  # one expert count per MoE layer (padding cannot add experts)
            sub = type(sub)(sub.hidden, tuple(w if t != "moe" else type(w)(**{**w.__dict__, "experts":
                            s.config.n_routed_experts}) for t, w in zip(s.config.layers_block_type, sub.layers)))
        new, old = tmp_path / f"new{k}", tmp_path / f"old{k}"
        save_slice(s, sub, new, layout=layout, dtype=dtype)
        old_save_pretrained(slice_budget(s, sub, layout=layout), old, dtype=dtype)
        same_files(new, old)


def test_slice_refuses_an_unpaddable_moe_budget_before_writing(tmp_path):
    s = _sorted(_moe(6))
    cfg = s.config
    moes = [i for i, t in enumerate(cfg.layers_block_type) if t == "moe"]
    full = full_subnet(cfg)
    layers = list(full.layers)
    layers[moes[0]] = type(layers[0])(**{**layers[moes[0]].__dict__, "experts": cfg.n_group})
    with pytest.raises(ee.BudgetError, match="routed experts"):
        save_slice(s, type(full)(full.hidden, tuple(layers)), tmp_path / "x", layout="padded")
    assert not (tmp_path / "x").exists()


def test_slicing_imports_no_symbolic_shapes(tmp_path):
    """Slicing (float, padded layout, and a quantized family) runs no operation on the meta device:
    torch's first meta operation imports its Python meta kernels with sympy (~900 modules, ~150 MB of
    a command's resident memory), which a slice of a 100M checkpoint had paid on top of its weights.
    Checked in a fresh interpreter (this one has imported everything already)."""
    import subprocess
    import sys

    from elastic_export import quant
    from elastic_export.qcheckpoint import quantize_nested
    from test_onnx_quant import aligned_family

    model = random_model(0, head_order="rank_major", hidden_size=64, mamba_head_dim=16, head_dim=16,
                         intermediate_size=96).eval()
    fam = {k: v for k, v in aligned_family(model.config, 16).items() if k != "full"}
    save_nested(tmp_path / "nested", model, fam)
    quantize_nested(tmp_path / "nested", tmp_path / "q4", quant.QuantSpec("int4", block=16))
    code = f"""
import sys
import elastic_export as ee
from elastic_export.nested import load_nested
from elastic_export.qcheckpoint import slice_quantized_dir
from elastic_export.slicing import save_slice
ck = load_nested({str(tmp_path / 'nested')!r})
m, fam = ck.model, ck.budgets
for name, s in fam.items():
    save_slice(m, s, {str(tmp_path)!r} + "/s_" + name, layout="padded")
slice_quantized_dir({str(tmp_path / 'q4')!r}, "all", {str(tmp_path / 'sq')!r}, layout="compact", echo=lambda *a: None)
print("sympy" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "sq" / "b2" / "model.safetensors").is_file()
