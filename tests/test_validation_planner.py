"""Device planner at real scale (meta-free: config and accounting only) and its command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from elastic_export.cli import main
from elastic_export.config import preset
from elastic_export.errors import ConfigError
from elastic_export.search import plan_budgets
from validation.planner import EDGE, PROFILES, deployment_comparison, device_profile, fit_table, plan


@pytest.fixture(scope="module")
def nano():
    cfg = preset("nemotron-nano-v2-12b")
    return cfg, plan_budgets(cfg, ["9B", "6B"])


def test_paper_deployment_memory(nano):
    """Nested 6B + 9B + 12B in BF16 ~24.6 GB against ~42 GB for separate 9B + 12B (paper, Table 3)."""
    cfg, budgets = nano
    c = deployment_comparison(cfg, budgets, "bfloat16", pair=("full", "9B"))
    assert c["nested"] / 1e9 == pytest.approx(24.6, abs=0.1)
    assert c["separate_pair"] / 1e9 == pytest.approx(42.3, abs=0.5)  # 12.31B + ~9B parameters, 2 bytes each
    assert c["separate_all"] > c["separate_pair"] > c["nested"]


def test_edge_fit_table_at_8k_and_49k(nano):
    cfg, budgets = nano
    table = fit_table(cfg, budgets, (8192, 49152))
    assert set(table) == set(EDGE)
    assert table["orin-nano-8gb"] == {8192: [], 49152: []}
    assert table["orin-nx-16gb"] == {8192: ["6B"], 49152: []}
    assert table["agx-orin-32gb"] == {8192: ["full", "9B", "6B"], 49152: ["9B", "6B"]}
    assert table["agx-orin-64gb"] == {8192: ["full", "9B", "6B"], 49152: ["full", "9B", "6B"]}
    assert table["agx-thor-128gb"][49152] == ["full", "9B", "6B"]


def test_plan_counts_every_part(nano):
    cfg, budgets = nano
    p = plan(cfg, budgets, ["h100-80gb", "custom:24"], 8192, batch=2, dtypes=("bfloat16", "float32"))
    h100, custom = p["devices"]
    full_bf16 = h100["dtypes"]["bfloat16"]["budgets"]["full"]
    parts = ("weights", "kv_cache", "ssm_state", "conv_state", "activations")
    assert full_bf16["total"] == sum(full_bf16[k] for k in parts)
    # SSM state is float32 at every precision; KV cache follows the dtype
    full_fp32 = h100["dtypes"]["float32"]["budgets"]["full"]
    assert full_fp32["ssm_state"] == full_bf16["ssm_state"] and full_fp32["kv_cache"] == 2 * full_bf16["kv_cache"]
    # 6 attention layers x K and V x 2 sequences x 8 KV heads x 8192 tokens x 128 x 2 bytes
    assert full_bf16["kv_cache"] == 6 * 2 * 2 * 8 * 8192 * 128 * 2
    assert h100["dtypes"]["float32"]["fits"] == ["full", "9B", "6B"]
    assert custom["profile"]["memory_gb"] == 24 and custom["dtypes"]["bfloat16"]["fits"] == ["9B", "6B"]
    assert not custom["dtypes"]["bfloat16"]["family"]["fits"]
    chunked = plan(cfg, budgets, ["h100-80gb"], 49152, dtypes=("bfloat16",), prefill_chunk=2048)
    whole = plan(cfg, budgets, ["h100-80gb"], 49152, dtypes=("bfloat16",))
    a = chunked["devices"][0]["dtypes"]["bfloat16"]["budgets"]["full"]["activations"]
    assert a < whole["devices"][0]["dtypes"]["bfloat16"]["budgets"]["full"]["activations"] / 10


def test_profiles():
    assert PROFILES["h200-141gb"].memory_gb == 141 and PROFILES["orin-nano-8gb"].kind == "edge"
    assert 0 < PROFILES["orin-nano-8gb"].usable_bytes < 8e9
    assert device_profile("24GB").memory_gb == 24 and device_profile("edge:8").kind == "edge"
    for bad in ("h300", "custom:-1", "0"):
        with pytest.raises(ConfigError):
            device_profile(bad)


def test_plan_memory_cli(tmp_path):
    r = CliRunner().invoke(main, ["plan-memory", "--preset", "nemotron-nano-v2-12b", "--budget", "9B", "--budget",
                                  "6B", "--device", "edge", "--context", "8192", "--context", "49152",
                                  "--json", str(tmp_path / "plan.json"), "--plot", str(tmp_path / "plan.png")])
    assert r.exit_code == 0, r.output
    assert "one copy: 24.62 GB" in r.output and "separate full + 9B: 42.6" in r.output
    assert "Jetson Orin NX 16GB" in r.output and "budgets that fit" in r.output
    out = json.loads((tmp_path / "plan.json").read_text())
    assert [p["context"] for p in out["plans"]] == [8192, 49152]
    import matplotlib.image as mpimg

    assert mpimg.imread(tmp_path / "plan.png").shape[2] in (3, 4)
    for args in (["--device", "h300"], ["--context", "0"], ["--dtype", "fp64"], ["--budget", "200%"]):
        r = CliRunner().invoke(main, ["plan-memory", "--preset", "nemotron-nano-v2-12b", *args])
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("budgets, lines", [
    (["9B"], ["separate full + 9B: "]),
    (["9B", "6B"], ["separate full + 9B: ", "separate full + 9B + 6B: "]),
])
def test_plan_memory_names_each_separate_deployment_once(budgets, lines, tmp_path):
    """With two budgets the pair is every budget: one `separate` line (and one bar), not the same twice."""
    args = ["plan-memory", "--preset", "nemotron-nano-v2-12b", "--device", "agx-orin-64gb"]
    r = CliRunner().invoke(main, args + [a for b in budgets for a in ("--budget", b)] + ["--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    separate = [ln.strip() for ln in r.output.splitlines() if ln.strip().startswith("separate ")]
    assert [s.split(": ")[0] + ": " for s in separate] == lines, r.output
    assert (tmp_path / "p.png").stat().st_size > 0
