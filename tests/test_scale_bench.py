"""benchmarks/scale_bench.py measures what it reports: the checkpoint it writes (bytes, parameters,
bf16, shards) read back independently, peak RSS from /usr/bin/time and from the getrusage fallback
against a process of known allocation, and the table's ratios and growth from those numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_bench.py"


@pytest.fixture(scope="module")
def sb():
    spec = importlib.util.spec_from_file_location("scale_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("fallback", [False, True])
def test_peak_rss_of_a_known_allocation(sb, tmp_path, monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(sb, "_time_cmd", lambda: None)
    elif sb._time_cmd() is None:
        pytest.skip("/usr/bin/time -v missing (apt package `time`)")
    mb = 157  # an odd size, touched page by page
    code = f"b = bytearray({mb} * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1"
    r = sb.measure([sys.executable, "-c", code], 60, tmp_path / "alloc.log")
    assert r["rc"] == 0
    assert mb * 2**20 <= r["peak_rss"] <= (mb + 120) * 2**20  # the allocation plus an interpreter
    r = sb.measure([sys.executable, "-c", "import sys; sys.exit(3)"], 60, tmp_path / "fail.log")
    assert r["rc"] == 3


def test_timeout_reports_the_peak_so_far(sb, tmp_path):
    if sb._time_cmd() is None:
        pytest.skip("/usr/bin/time -v missing (apt package `time`)")
    code = "import time\nb = bytearray(83 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\ntime.sleep(60)"
    r = sb.measure([sys.executable, "-c", code], 3, tmp_path / "slow.log")
    assert r["rc"] == 124 and r["timed_out"] and r["wall_s"] < 20
    assert r["peak_rss"] >= 83 * 2**20


def test_growth_from_measured_numbers(sb):
    a = {"params": 1000, "ckpt_bytes": 2000, "steps": {"nest": {"peak_rss": 3000, "wall_s": 2.0}}}
    b = {"params": 8000, "ckpt_bytes": 16000, "steps": {"nest": {"peak_rss": 24000, "wall_s": 4.0}}}
    g = sb.growth(a, b, "nest")
    assert g["exponent"] == pytest.approx(1.0)  # 8x params, 8x RSS: linear
    assert g["slope"] == pytest.approx(21000 / 14000)
    assert g["time_exponent"] == pytest.approx(1 / 3)


def test_table_of_saved_runs(sb, tmp_path, capsys):
    def size(label, params, rss):
        r = {"rc": 0, "wall_s": 1.5, "peak_rss": rss, "ratio": rss / (2 * params), "target": 1.3, "pass": False}
        return {"label": label, "params": params, "ckpt_bytes": 2 * params, "steps": {"nest": r}}
    for name, sz in (("a", size("10M", 10**7, 5 * 10**7)), ("b", size("30M", 3 * 10**7, 9 * 10**7))):
        (tmp_path / f"{name}.json").write_text(json.dumps({"baseline": None, "sizes": [sz]}))
    sizes = sb.main(["--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    g = sizes[1]["growth"]["nest"]
    assert g["exponent"] == pytest.approx(math.log(9 / 5) / math.log(3))
    assert g["slope"] == pytest.approx(4 * 10**7 / (4 * 10**7))
    out = capsys.readouterr().out
    assert f"| 30M | 30,000,000 | 0.06 | nest | 0 | 1.5 | 0.09 | 1.50x | <= 1.3x MISS | -x | {g['exponent']:.2f} | 1.00 |" in out


def test_tiny_checkpoint_and_steps(sb, tmp_path, monkeypatch):
    monkeypatch.setattr(sb, "SHARD_BYTES", 2**20 + 12345)  # an odd shard limit: several shards
    steps = ["inspect", "rank"]
    base, sizes = sb.run_bench(["2M"], tmp_path, steps, timeout=300, with_baseline=False)
    (sz,) = sizes
    parent = tmp_path / "2M" / "parent"
    files = sorted(parent.glob("*.safetensors"))
    assert sz["ckpt_bytes"] == sum(f.stat().st_size for f in files) and sz["shards"] == len(files) > 1
    assert (parent / "model.safetensors.index.json").is_file()
    numel, dtypes = 0, set()
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                numel += math.prod(sl.get_shape())
                dtypes.add(sl.get_dtype())
    assert dtypes == {"BF16"} and sz["params"] == numel
    assert abs(numel - 2e6) / 2e6 < 0.2  # near the asked size
    cfg = json.loads((parent / "config.json").read_text())
    assert {"linear_attention", "full_attention", "mlp"} == set(cfg["layers_block_type"])
    assert (tmp_path / "2M" / "sorted").is_dir()  # rank wrote its output
    for s in steps:
        r = sz["steps"][s]
        assert r["rc"] == 0, Path(r["log"]).read_text()
        assert 50 * 2**20 < r["peak_rss"] < 8 * 2**30
        assert r["ratio"] == r["peak_rss"] / sz["ckpt_bytes"]
        assert r["target"] == sb.TARGET.get(s)
    assert sz["steps"]["rank"]["pass"] == (sz["steps"]["rank"]["ratio"] <= 2.0)
    text = sb.table(sizes, steps)
    for s in steps:
        r = sz["steps"][s]
        assert f"| 2M | {numel:,} | " in text and f"| {s} | 0 | {r['wall_s']:.1f} | " in text
        assert f"{r['ratio']:.2f}x" in text
