"""Elastic budget control (engines.schedule): budget A until a stop, then budget B after one re-prefill.

The reference is done by hand with the model's own greedy generation (elastic_export.generate): budget
A on the prompt, cut each row after its first stop, then budget B on prompt + that text.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from elastic_export.cli import main
from elastic_export.generate import generate
from elastic_fixtures import family
from engines.schedule import Phase, scheduled_generate
from engines.torch_engine import TorchEngine
from helpers import random_model
from test_speculative import padded_batch


def first_stop(row: list[int], marker: list[int]) -> int | None:
    for i in range(len(row) - len(marker) + 1):
        if row[i:i + len(marker)] == marker:
            return i + len(marker)
    return None


def by_hand(model, budgets, ids, mask, n, a, b, marker=None, count=None):
    """Rows of new tokens: A greedily, cut after the first marker (or count), then B on the whole text."""
    first = generate(model, ids, n, subnet=budgets[a], attention_mask=mask)[:, ids.shape[1]:].tolist()
    rows = []
    for i, r in enumerate(first):
        cut = first_stop(r, marker) if marker else count
        kept = r[:cut] if cut is not None else r
        if len(kept) < n:
            prefix = torch.tensor([ids[i][mask[i].bool()].tolist() + kept])
            kept += generate(model, prefix, n - len(kept), subnet=budgets[b])[0, prefix.shape[1]:].tolist()
        rows.append(kept)
    return torch.tensor(rows)


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1])
def test_schedule_equals_a_then_reprefill_b_by_hand(seed):
    """A marker of two tokens found at different steps per row (ragged switch: one left-padded
    re-prefill), and a token count (aligned switch: the kept prompt prefill + the suffix)."""
    model = random_model(seed, head_order="rank_major", chunk_size=8).eval()
    budgets = family(model.config, seed, 2)
    eng = TorchEngine(model, budgets)
    ids, mask = padded_batch(model.config.vocab_size, seed)
    L, n = ids.shape[1], 40
    plain = generate(model, ids, n, subnet=budgets["b1"], attention_mask=mask)[:, L:].tolist()
    marker = plain[1][5:7]  # appears in row 1 at step 7 at the latest; maybe elsewhere in other rows
    for a, b in (("b1", "full"), ("full", "b1")):
        m = marker if a == "b1" else generate(model, ids, n, attention_mask=mask)[:, L:].tolist()[0][3:5]
        st = {}
        out = scheduled_generate(eng, ids, n, [Phase(a, until=(tuple(m),)), Phase(b)], attention_mask=mask, stats=st)
        assert torch.equal(out[:, L:], by_hand(model, budgets, ids, mask, n, a, b, marker=m)), (a, b)
        assert st["switches"] and min(st["switches"][0]["after"]) <= 7
        cache = {}
        for rep in range(2):  # the second generation reuses the kept prefill of B's prompt
            st = {}
            out = scheduled_generate(eng, ids, n, [Phase(a, max_tokens=11), Phase(b)], attention_mask=mask,
                                     prompt_cache=cache, stats=st)
            assert torch.equal(out[:, L:], by_hand(model, budgets, ids, mask, n, a, b, count=11)), (a, b, rep)
            sw = st["switches"][0]
            assert sw["after"] == [11, 11, 11] and sw["tokens"] == 11 and sw["reused_prompt"] == (rep == 1)


@torch.no_grad()
def test_schedule_phase_stops_at_eos_and_shipped_model():
    """The shipped model: 50pct writes the steps until '####', full writes the answer (and back)."""
    from elastic_export import default_model_path
    from elastic_export.build import load_family
    from elastic_export.tasks import make_tasks
    from elastic_export.tokenizer import load_tokenizer

    if not (default_model_path() / "elastic.json").is_file():
        pytest.skip("the default model is not shipped in this checkout")
    model, fam, src = load_family(None)
    tok = load_tokenizer(src / "tokenizer")
    eng = TorchEngine(model, fam)
    marker = tok.encode("####")
    for t in make_tasks(2, "long", seed=5):
        ids = torch.tensor([tok.encode(t.prompt, add_bos=True)])
        for a, b in (("50pct", "full"), ("full", "50pct")):
            st = {}
            out = scheduled_generate(eng, ids, 80, [Phase(a, until=(tuple(marker),)), Phase(b)], stats=st)
            ref = by_hand(model, fam, ids, torch.ones_like(ids), 80, a, b, marker=marker)
            assert torch.equal(out[:, ids.shape[1]:], ref)
            assert "####" in tok.decode(out[0, ids.shape[1]:].tolist())
            assert st["switches"][0]["after"][0] < 80


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_run_draft_and_budget_control():
    from elastic_export import default_model_path

    if not (default_model_path() / "elastic.json").is_file():
        pytest.skip("the default model is not shipped in this checkout")
    prompt = "Q: 7, +5, *2, -3, +4\nA:"
    plain = _run("run", "--prompt", prompt, "--max-new-tokens", "60")
    spec = _run("run", "--prompt", prompt, "--max-new-tokens", "60", "--draft", "50pct", "--draft-len", "3")
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert spec.stdout == plain.stdout and "acceptance" in spec.stderr
    small = _run("run", "--budget", "50pct", "--prompt", prompt, "--max-new-tokens", "60").stdout
    sched = _run("run", "--prompt", prompt, "--max-new-tokens", "60", "--reason-budget", "50pct",
                 "--answer-budget", "full")
    assert sched.exit_code == 0, sched.output
    head = small[:small.index("####") + 4]
    assert sched.stdout.startswith(head) and "[switch -> full]" in sched.stderr
    for bad, needle in ((["--reason-budget", "50pct"], "needs both budgets"),
                        (["--draft", "50pct", "--draft-len", "0"], "--draft-len"),
                        (["--draft", "nope"], "unknown budget 'nope'")):
        r = _run("run", "--prompt", prompt, *bad)
        assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output, r.output
