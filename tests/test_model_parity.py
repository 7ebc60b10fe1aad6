"""Our model against transformers' NemotronHForCausalLM, and caches against the full forward."""

import pytest
import torch

import elastic_export as ee
from helpers import hf_model, random_model

SEEDS = [0, 1, 2, 3, 4, 5]


def _with_ngroups(seed):
    # cycle n_groups 1/2/4 and tied/untied explicitly so every combination is covered
    return random_model(seed, n_groups=[1, 2, 4][seed % 3], mamba_num_heads=[1, 2, 4][seed % 3] * [3, 5][seed % 2],
                        tie_word_embeddings=seed % 2 == 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_forward_matches_transformers(seed, tmp_path):
    model = _with_ngroups(seed)
    model.save_pretrained(tmp_path)
    ref = hf_model(tmp_path)
    L = model.config.chunk_size * 2 + 5  # not a multiple of chunk_size, several chunks
    ids = torch.randint(0, model.config.vocab_size, (2, L), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert ours.shape == (2, L, model.config.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("seed", [0, 1])
def test_transformers_checkpoint_loads_in_ours(seed, tmp_path):
    """A checkpoint written by transformers (its own save_pretrained) loads here with identical logits."""
    model = _with_ngroups(seed)
    model.save_pretrained(tmp_path / "ours")
    ref = hf_model(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "theirs")
    back = ee.load(tmp_path / "theirs")
    ids = torch.randint(0, model.config.vocab_size, (3, 19))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
        assert (back(ids) - ref(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefill_then_decode_equals_full_forward(seed):
    model = _with_ngroups(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 29))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :11], cache=cache)]
        for t in range(11, 29):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_prefill_equals_one_prefill(seed):
    """A prompt prefilled in two chunks (the second several tokens long) equals one prefill."""
    model = _with_ngroups(seed)
    cs = model.config.chunk_size
    ids = torch.randint(0, model.config.vocab_size, (2, cs + 13))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        first = model(ids[:, :cs + 4], cache=cache)
        second = model(ids[:, cs + 4:], cache=cache)
        nxt = torch.randint(0, model.config.vocab_size, (2, 1))
        after = model(nxt, cache=cache)
        ref_after = model(torch.cat([ids, nxt], 1))[:, -1:]
    assert (torch.cat([first, second], 1) - full).abs().max().item() <= 1e-4
    assert (after - ref_after).abs().max().item() <= 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_left_padded_batch_matches_each_alone(seed):
    model = _with_ngroups(seed)
    V = model.config.vocab_size
    lengths = [17, 9, 13]
    prompts = [torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed * 10 + i))
               for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        cache = model.new_cache()
        model(ids, attention_mask=mask, cache=cache)
        nxt = torch.randint(3, V, (len(prompts), 1))
        step = model(nxt, cache=cache)
        for i, p in enumerate(prompts):
            alone = model(p[None])
            n = len(p)
            assert (batch[i, T - n:] - alone[0]).abs().max().item() <= 1e-4
            alone_next = model(torch.cat([p, nxt[i]])[None])[:, -1]
            assert (step[i, 0] - alone_next[0]).abs().max().item() <= 1e-4


def test_generate_greedy_matches_transformers(tmp_path):
    model = _with_ngroups(1)
    model.save_pretrained(tmp_path)
    ref = hf_model(tmp_path)
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    ours = model.generate(ids, 16)
    with torch.no_grad():
        theirs = ref.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
                              attention_mask=torch.ones_like(ids))
    assert torch.equal(ours, theirs)


def test_sampled_generate_is_reproducible_and_valid():
    model = _with_ngroups(2)
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    a = model.generate(ids, 8, temperature=0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, 8, temperature=0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 13)
    assert int(a.max()) < model.config.vocab_size


def test_bfloat16_runs_close_to_float32():
    model = _with_ngroups(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    with torch.no_grad():
        ref = model(ids)
        low = model.to(torch.bfloat16)(ids)
        cache = model.new_cache()
        model(ids[:, :20], cache=cache)
        step = model(ids[:, 20:21], cache=cache)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert cache.ssm[[i for i, t in enumerate(model.config.layers_block_type) if t == "linear_attention"][0]].dtype \
        == torch.float32
    assert (step[:, 0] - low[:, 20]).abs().max().item() < 0.1 * ref.abs().max().item()
