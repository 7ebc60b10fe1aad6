"""Parity with transformers' NemotronH on the config fields where it departs from the obvious reading.

Each checkpoint is written by transformers itself (its own NemotronHForCausalLM, random weights, its
save_pretrained), then read here, written back and read by transformers again:
- ``tie_word_embeddings=True``: transformers never ties and stores its own lm_head.weight;
- ``attention_bias=True``: transformers builds attention without biases;
- ``time_step_limit=(0.0, 0.05)``: transformers ignores it (dt >= time_step_min in the chunked scan);
- ``time_step_min=0.2``: the chunked scan clamps dt below (transformers' decode step does not, we do);
- ``mlp_hidden_act="gelu"``, and a non-SiLU ``mamba_hidden_act`` (the conv activation).
The same models then run in the torch engine and go through ``build`` (ONNX) and ONNX Runtime.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import elastic_export as ee
from elastic_export import activations
from elastic_export.errors import ConfigError
from elastic_export.model import build_model
from helpers import hf_model, randomize, tiny_config

CASES = {
    "tied": dict(tie_word_embeddings=True),
    "attention_bias": dict(attention_bias=True),
    "time_step_limit": dict(time_step_limit=(0.0, 0.05)),
    "gelu": dict(mlp_hidden_act="gelu"),
    "time_step_min": dict(time_step_min=0.2),
    "mamba_act": dict(mamba_hidden_act="gelu_pytorch_tanh", mlp_hidden_act="silu"),
}
TOL = 1e-4
NEW = 10


def _theirs(tmp_path, name: str, seed: int):
    """A random hybrid (all three layer types, odd sizes) built and saved by transformers."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = tiny_config(seed, **{"tie_word_embeddings": False, **CASES[name]})
    hf_cfg = NemotronHConfig.from_dict(cfg.to_dict())
    torch.manual_seed(seed)
    ref = randomize(NemotronHForCausalLM(hf_cfg), seed).eval()
    path = tmp_path / "theirs"
    ref.save_pretrained(str(path))
    return ref, path


def _ids(cfg, seed: int, b: int = 2):
    L = 2 * cfg.chunk_size + 5  # several chunks, not a multiple of chunk_size
    return torch.randint(3, cfg.vocab_size, (b, L), generator=torch.Generator().manual_seed(seed))


def _greedy_hf(ref, ids, name: str):
    """transformers' greedy tokens. Where the dt clamp binds (time_step_min) its cached decode departs
    from its chunked scan and ours follows the scan (model.dt_limit): compare with its uncached
    generation, every step through the scan."""
    return ref.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                        attention_mask=torch.ones_like(ids), use_cache=name != "time_step_min")


@pytest.mark.parametrize("name,seed", [(name, seed) for seed, name in enumerate(CASES)])  # a config per case
def test_transformers_checkpoint_round_trips(tmp_path, name, seed):
    ref, theirs = _theirs(tmp_path, name, seed)
    ours = ee.load(theirs).eval()
    ids = _ids(ours.config, seed)
    with torch.no_grad():
        want = ref(ids).logits
        assert (ours(ids) - want).abs().max().item() <= TOL
    want_tokens = _greedy_hf(ref, ids[:1, :17], name)
    assert torch.equal(ours.generate(ids[:1, :17], NEW), want_tokens)

    ours.save_pretrained(tmp_path / "ours")
    back = hf_model(tmp_path / "ours")
    # the same parameters, names and values, as transformers wrote them
    theirs_sd, back_sd = ref.state_dict(), back.state_dict()
    assert sorted(theirs_sd) == sorted(back_sd)
    assert all(torch.equal(theirs_sd[k], back_sd[k]) for k in theirs_sd)
    with torch.no_grad():
        assert (back(ids).logits - want).abs().max().item() <= TOL
    assert torch.equal(_greedy_hf(back, ids[:1, :17], name), want_tokens)


def test_tied_config_with_its_own_lm_head(tmp_path):
    """The tie case is real: the file's lm_head differs from the embeddings; we use it, and keep it."""
    ref, theirs = _theirs(tmp_path, "tied", 0)
    with safe_open(str(theirs / "model.safetensors"), "pt") as f:
        head, emb = f.get_tensor("lm_head.weight"), f.get_tensor("backbone.embeddings.weight")
    assert not torch.allclose(head, emb)
    ours = ee.load(theirs)
    assert ours.lm_head is not None and torch.equal(ours.lm_head.weight, head)
    assert ee.load_config(theirs).tie_word_embeddings is False  # the config says what the weights do
    ours.save_pretrained(tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), head)
    # slicing and the nested format keep it too (a budget of embedding width d: its first d columns)
    from elastic_export.elastic import full_subnet
    from elastic_export.nested import load_nested, save_nested

    sub = full_subnet(ours.config)
    sub = type(sub)(ours.config.hidden_size - 8, sub.layers)
    assert torch.equal(ee.slice_budget(ours, sub).lm_head.weight, head[:, :sub.hidden])
    save_nested(tmp_path / "nested", ours, {"full": full_subnet(ours.config)})
    assert torch.equal(load_nested(tmp_path / "nested").model.lm_head.weight, head)
    # tied only without the tensor: our own tied model, saved, still carries a copy transformers reads
    cfg = tiny_config(0, tie_word_embeddings=True)
    tied = randomize(build_model(cfg), 0)
    assert tied.lm_head is None
    tied.save_pretrained(tmp_path / "tied")
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is True
    ids = _ids(cfg, 0)
    with torch.no_grad():
        assert (hf_model(tmp_path / "tied")(ids).logits - tied(ids)).abs().max().item() <= TOL


def test_decode_step_clamps_as_the_chunked_scan(tmp_path):
    """dt is clamped at time_step_min in transformers' chunked scan but not in its decode step
    (model.dt_limit). Our cached decode clamps as the scan does: step by step it equals transformers'
    full forward over the same tokens, where transformers' own decode departs from it (the clamp binds)."""
    ref, theirs = _theirs(tmp_path, "time_step_min", 1)
    ours = ee.load(theirs).eval()
    ids = _ids(ours.config, 1, b=1)[:, :13]
    out = ref.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                       attention_mask=torch.ones_like(ids), output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    with torch.no_grad():
        scan = ref(seq[:, :-1]).logits[:, ids.shape[1] - 1:]  # transformers, every position through the scan
        cache = ours.new_cache()
        steps = [ours(ids, cache=cache)[:, -1]]
        for t in range(ids.shape[1], seq.shape[1] - 1):
            steps.append(ours(seq[:, t:t + 1], cache=cache)[:, -1])
    assert (torch.stack(steps, 1) - scan).abs().max().item() <= TOL
    assert (torch.stack(out.logits, 1) - scan).abs().max().item() > 10 * TOL


# ---- the same checkpoints through build + ONNX Runtime --------------------------------------------

@pytest.mark.parametrize("mode", ["standard", "decomposed"])
@pytest.mark.parametrize("name", list(CASES))
def test_build_and_onnx_runtime_match_transformers(tmp_path, name, mode):
    pytest.importorskip("onnxruntime")
    from elastic_export.build import build
    from elastic_export.elastic import full_subnet
    from elastic_export.nested import save_nested
    from engines.ort_engine import OrtEngine

    ref, theirs = _theirs(tmp_path, name, 2)
    ours = ee.load(theirs)
    save_nested(tmp_path / "nested", ours, {"full": full_subnet(ours.config)})
    build(tmp_path / "nested", tmp_path / "build", target="onnx", ssm_op=mode)
    eng = OrtEngine(tmp_path / "build", threads=1)
    ids = _ids(ours.config, 2)
    with torch.no_grad():
        want = ref(ids).logits
    assert (eng.prefill(ids) - want).abs().max().item() <= TOL
    prompt = ids[:1, :17]
    assert torch.equal(eng.generate(prompt, NEW), _greedy_hf(ref, prompt, name))


@pytest.mark.parametrize("name", list(CASES))
def test_torch_engine_matches_transformers(tmp_path, name):
    from elastic_export.elastic import full_subnet
    from engines.torch_engine import TorchEngine

    ref, theirs = _theirs(tmp_path, name, 3)
    ours = ee.load(theirs).eval()
    eng = TorchEngine(ours, {"full": full_subnet(ours.config)})
    prompt = _ids(ours.config, 3)[:1, :17]
    assert torch.equal(eng.generate(prompt, NEW), _greedy_hf(ref, prompt, name))
    # its lean decode step against the model's cached forward, logits step by step
    eng.prefill(prompt)
    cache = ours.new_cache()
    with torch.no_grad():
        ours(prompt, cache=cache)
        for t in torch.randint(3, ours.config.vocab_size, (5, 1, 1), generator=torch.Generator().manual_seed(4)):
            assert (eng.decode(t[0]) - ours(t, cache=cache)[:, -1]).abs().max().item() <= 1e-5


# ---- the activation table ----------------------------------------------------------------------

def test_activation_table_matches_transformers_act2fn():
    from transformers.activations import ACT2FN

    x = torch.cat([torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 4,
                   torch.tensor([-30.0, -12.0, -6.0, 0.0, 6.0, 12.0, 30.0])])
    for name in activations.NAMES:
        assert torch.allclose(activations.get(name)(x), ACT2FN[name](x), atol=1e-6, rtol=1e-6), name
    assert set(activations.NAMES) | set(activations.REFUSED) == set(ACT2FN)


def test_activation_onnx_nodes_match_torch():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto

    from elastic_export.onnx_graph import GraphBuilder

    x = (torch.randn(3, 257, generator=torch.Generator().manual_seed(1)) * 4).numpy()
    for name in activations.NAMES:
        g = GraphBuilder(wf=None)
        inp = g.input("x", TensorProto.FLOAT, [3, 257])
        g.output(activations.onnx(g, name, inp), "y", TensorProto.FLOAT, [3, 257])
        sess = ort.InferenceSession(g.model(name, 18).SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x})[0]
        want = activations.get(name)(torch.from_numpy(x)).numpy()
        assert np.abs(got - want).max() <= 1e-5, name


@pytest.mark.parametrize("field", ["mlp_hidden_act", "mamba_hidden_act"])
@pytest.mark.parametrize("act", ["prelu", "no_such_act"])
def test_unsupported_activation_names_the_field(tmp_path, field, act):
    d = tiny_config(0).to_dict()
    d[field] = act
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        ee.load_config(tmp_path)
    msg = str(e.value)
    assert field in msg and "config.json" in msg and act in msg and "gelu" in msg


def test_file_with_attention_biases_is_refused_with_the_reason(tmp_path):
    from safetensors.torch import load_file, save_file

    from elastic_export.errors import CheckpointError

    _, theirs = _theirs(tmp_path, "attention_bias", 0)
    f = theirs / "model.safetensors"
    state = load_file(str(f))
    layer = ee.load_config(theirs).layers_block_type.index("full_attention")
    state[f"backbone.layers.{layer}.mixer.q_proj.bias"] = torch.zeros(3)
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="attention has no biases"):
        ee.load(theirs)
