"""Self-speculative decoding (engines.speculative) and the state rewind it rests on (cache.rewind).

References: a float64 recurrence (the prefix state), a fresh forward over the kept tokens (rewind),
and the model's own greedy generation, one forward per token (elastic_export.generate).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from elastic_export.elastic import full_subnet
from elastic_export.generate import generate, token_probs
from elastic_export.ssd import expand_groups, ssd_prefix_state
from elastic_fixtures import family, save_nested_fixture
from engines.speculative import speculative_generate
from engines.torch_engine import TorchEngine
from helpers import random_model


def near_full(cfg):
    """The full budget less a few FFN neurons: a draft that agrees often, not always."""
    full = full_subnet(cfg)
    layers = tuple(dataclasses.replace(w, ffn=w.ffn - 3) if w.ffn else w for w in full.layers)
    return dataclasses.replace(full, layers=layers)


def padded_batch(vocab: int, seed: int, b: int = 3, l: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, l), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, b):
        mask[i, :2 * i + 1] = 0  # left padding, a different amount per row
    return ids, mask


@pytest.mark.parametrize("head_order", ["group_contiguous", "rank_major"])
def test_prefix_state_equals_float64_recurrence(head_order):
    g = torch.Generator().manual_seed(3)
    b, l, h, p, G, n = 2, 7, 6, 5, 3, 4
    x, dt = torch.randn(b, l, h, p, generator=g), torch.rand(b, l, h, generator=g)
    A, B = -torch.rand(h, generator=g) * 2, torch.randn(b, l, G, n, generator=g)
    s0 = torch.randn(b, h, p, n, generator=g)
    S = s0.double()
    Bh = expand_groups(B.double(), h, head_order, 2)
    for t in range(l):
        S = S * torch.exp(dt[:, t].double() * A.double())[..., None, None] + \
            (dt[:, t].double()[..., None] * x[:, t].double())[..., None] * Bh[:, t, :, None, :]
    torch.testing.assert_close(ssd_prefix_state(x, dt, A, B, s0, head_order).double(), S, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1])
def test_rewind_equals_a_forward_of_the_kept_tokens(seed):
    """A recorded forward of 7 tokens after a padded 13-token prompt (chunk size 8: the window crosses a
    chunk boundary), rewound to keep 0..7 of them: every state and the next logits equal a forward of
    prompt + kept tokens."""
    model = random_model(seed, head_order="rank_major", chunk_size=8).eval()
    V = model.config.vocab_size
    ids, mask = padded_batch(V, seed, b=2, l=13)
    new = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(seed + 9))
    probe = torch.randint(0, V, (2, 1), generator=torch.Generator().manual_seed(seed + 5))
    for keep in (0, 1, 4, 7):
        cache = model.new_cache()
        model(ids, cache=cache, attention_mask=mask)
        cache.record()
        model(new, cache=cache)
        cache.rewind(keep)
        ref = model.new_cache()
        model(torch.cat([ids, new[:, :keep]], 1), cache=ref, attention_mask=torch.cat(
            [mask, torch.ones(2, keep, dtype=mask.dtype)], 1))
        assert cache.seen == ref.seen == 13 + keep
        for a, r in zip(cache.conv + cache.ssm, ref.conv + ref.ssm):
            if r is not None:
                torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(probe, cache=cache), model(probe, cache=ref), atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speculative_greedy_equals_plain_greedy(seed):
    """Several draft budgets (random, nearly full, the full one itself) and k (1, 3, adaptive); batch 3
    with different left padding; 70 tokens past SSM chunks of 8 and the KV cache's first growth."""
    model = random_model(seed, head_order="rank_major", chunk_size=8).eval()
    budgets = {**family(model.config, seed, 2), "near": near_full(model.config)}
    eng = TorchEngine(model, budgets)
    ids, mask = padded_batch(model.config.vocab_size, seed)
    ref = generate(model, ids, 70, attention_mask=mask)
    partial = 0
    for draft in ("b1", "near", "full"):
        for k in (1, 3, "auto"):
            st = {}
            out = speculative_generate(eng, ids, 70, draft=draft, draft_len=k, attention_mask=mask, stats=st)
            assert torch.equal(out, ref), (draft, k)
            assert st["emitted"] == 70
            if draft == "full":
                assert st["acceptance"] == 1.0  # the verify budget drafting for itself
            partial += 0 < st["acceptance"] < 1
    assert partial  # some runs accepted part of their drafts: the rewinds ran


@torch.no_grad()
def test_speculative_batch_one_long_generation():
    """One sequence, 150 tokens (KV growths, 19 chunks), a nearly-full draft."""
    model = random_model(4, head_order="rank_major", chunk_size=8).eval()
    eng = TorchEngine(model, {"full": full_subnet(model.config), "near": near_full(model.config)})
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    st = {}
    out = speculative_generate(eng, ids, 150, draft="near", draft_len=4, stats=st)
    assert torch.equal(out, generate(model, ids, 150))
    assert 0 < st["acceptance"] < 1 and st["rounds"] < 149  # drafts accepted and rejected along the way


@torch.no_grad()
def test_speculative_eos_pads_like_plain_generation():
    model = random_model(5, head_order="rank_major", chunk_size=8).eval()
    eng = TorchEngine(model, {"full": full_subnet(model.config), "near": near_full(model.config)})
    ids, mask = padded_batch(model.config.vocab_size, 5)
    plain = generate(model, ids, 40, attention_mask=mask)
    eos = int(plain[0, ids.shape[1] + 6])  # a token row 0 emits early
    ref = generate(model, ids, 40, attention_mask=mask, eos_token_id=eos)
    out = speculative_generate(eng, ids, 40, draft="near", attention_mask=mask, eos_token_id=eos)
    assert torch.equal(out, ref[:, :out.shape[1]]) and (out.shape[1] == ref.shape[1] or bool((out[:, -1] == eos).all()))


@torch.no_grad()
def test_speculative_sampling_keeps_the_verify_distribution():
    """The standard acceptance rule: 4000 rows (one batch) of one prompt, a draft that disagrees often.
    The second token's empirical distribution, given the most frequent first token, matches the verify
    budget's probabilities (exact ones, from a forward); drawing from the draft instead would not."""
    model = random_model(6, head_order="rank_major", vocab_size=13, chunk_size=8).eval()
    budgets = family(model.config, 6, 2)
    eng = TorchEngine(model, budgets)
    prompt = torch.randint(0, 13, (1, 6), generator=torch.Generator().manual_seed(6))
    rows = 4000
    gen = torch.Generator().manual_seed(0)
    st = {}
    out = speculative_generate(eng, prompt.expand(rows, -1), 3, draft="b1", draft_len=2, temperature=1.0,
                               generator=gen, stats=st)
    assert 0.05 < st["acceptance"] < 0.95
    first = out[:, 6]
    top = int(first.mode().values)
    second = out[first == top, 7]
    emp = torch.bincount(second, minlength=13).double() / len(second)
    seq = torch.cat([prompt, torch.tensor([[top]])], 1)
    p = token_probs(model(seq)[0, -1], 1.0).double()
    q = token_probs(model(seq, subnet=budgets["b1"])[0, -1], 1.0).double()
    tv, tv_draft = 0.5 * (emp - p).abs().sum(), 0.5 * (q - p).abs().sum()
    n = len(second)
    assert tv < 2.5 * (13 / n) ** 0.5, (float(tv), n)  # ~3 sigma for a 13-way multinomial of n draws
    assert tv_draft > 2 * tv  # the test can tell the draft's distribution from the verifier's


@torch.no_grad()
def test_onnx_runtime_speculative_equals_torch_greedy(tmp_path):
    """The same generator over the ONNX Runtime engine (the decode graph drafts and verifies)."""
    from elastic_export.build import build
    from engines.ort_engine import OrtEngine

    model = random_model(7, head_order="rank_major", chunk_size=8).eval()
    budgets = {"full": full_subnet(model.config), "near": near_full(model.config)}
    save_nested_fixture(tmp_path / "nested", model, budgets)
    build(tmp_path / "nested", tmp_path / "build", target="onnx")
    eng = OrtEngine(tmp_path / "build", threads=1)
    ids, mask = padded_batch(model.config.vocab_size, 7)
    st = {}
    out = speculative_generate(eng, ids, 30, draft="near", draft_len=3, attention_mask=mask, stats=st)
    assert torch.equal(out, generate(model, ids, 30, attention_mask=mask))
    assert 0 < st["acceptance"]


def _default():
    from elastic_export import default_model_path
    from elastic_export.build import load_family

    if not (default_model_path() / "elastic.json").is_file():
        pytest.skip("the default model is not shipped in this checkout")
    return load_family(None)


@torch.no_grad()
def test_shipped_model_speculative_equals_full_greedy():
    """The shipped model's reasoning tasks (short and long), left-padded batch: 50pct and 75pct drafts,
    fixed and adaptive k, equal the full budget's greedy answers token for token."""
    from elastic_export.tasks import make_tasks
    from elastic_export.tokenizer import load_tokenizer

    model, fam, src = _default()
    tok = load_tokenizer(src / "tokenizer")
    tasks = make_tasks(2, "short", seed=3) + make_tasks(2, "long", seed=3)
    prompts = [tok.encode(t.prompt, add_bos=True) for t in tasks]
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    ref = generate(model, ids, 64, attention_mask=mask)
    eng = TorchEngine(model, fam)
    for draft, k in (("50pct", 4), ("75pct", "auto")):
        st = {}
        assert torch.equal(speculative_generate(eng, ids, 64, draft=draft, draft_len=k, attention_mask=mask,
                                                stats=st), ref), draft
        assert st["acceptance"] > 0.3  # a trained nested family: the small budget agrees with the full one often
    one = speculative_generate(eng, ids[3:, L - len(prompts[3]):], 64, draft="50pct")
    assert torch.equal(one, generate(model, ids[3:, L - len(prompts[3]):], 64))
