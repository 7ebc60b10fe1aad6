"""benchmarks/gpu_check.py without a GPU: argument parsing, graceful refusals, and a CPU smoke run of
its kernel section under Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_help_and_arguments():
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(["--help"])
    assert e.value.code == 0
    a = gpu_check.parse_args(["--tiny", "--only", "kernels", "--budget-s", "10"])
    assert a.tiny and a.only == "kernels" and a.budget_s == 10


def test_bad_scan_shape_is_refused(capsys):
    assert gpu_check.main(["--scan-shape", "1,2,3"]) == 2
    assert "six integers" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_cuda_it_says_so(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cpu_needs_the_interpreter(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert gpu_check.main(["--device", "cpu"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_report_table_and_json(capsys):
    r = gpu_check.Report(10)
    r.check("a", True, "fine")
    r.check("b", False, "broken")
    r.time("scan", "1 ms", "3 ms", "3.0x", ">=3x")
    assert r.table() is False
    out = capsys.readouterr().out
    assert "FAIL  b" in out and "1/2 checks passed" in out and "3.0x" in out
    assert r.to_json()["timings"][0]["ratio"] == "3.0x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_fsdp_check_without_cuda_says_so(capsys):
    import fsdp_gpu_check

    assert fsdp_gpu_check.parse_args(["--gpus", "2"]).gpus == 2
    assert fsdp_gpu_check.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_gpu_check_sh_runs_the_fsdp_check():
    sh = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert "benchmarks/fsdp_gpu_check.py" in sh and '[ "$FSDP" -eq 0 ]' in sh
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0


pytest.importorskip("triton")


def test_cpu_smoke_run_of_the_kernel_section(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--only", "kernels", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "4/4 checks passed" in r.stdout
    assert (tmp_path / "r.json").is_file()
