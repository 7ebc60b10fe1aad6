"""engines/cpp: the C++ runner compiles (against a stand-in NvInfer.h where TensorRT is absent) and
its CMake project configures, or, without TensorRT, stops with a message naming what is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "engines" / "cpp"
CUDA_INCLUDE = Path("/usr/local/cuda/include")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
@pytest.mark.skipif(not (CUDA_INCLUDE / "cuda_runtime_api.h").is_file(), reason="no CUDA headers")
def test_runner_compiles_against_the_documented_api():
    r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                        "-I", str(ROOT / "tests" / "fixtures" / "trt_stub"), "-I", str(CUDA_INCLUDE),
                        str(CPP / "elastic_trt_run.cpp")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake")
def test_cmake_configures_or_names_what_is_missing(tmp_path):
    r = subprocess.run(["cmake", "-S", str(CPP), "-B", str(tmp_path / "b")], capture_output=True, text=True,
                       timeout=120)
    if r.returncode == 0:
        assert "TensorRT" in r.stdout
    else:
        out = r.stdout + r.stderr
        assert "TensorRT not found" in out or "CUDA" in out, out
