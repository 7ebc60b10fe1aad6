"""Every command line README.md shows runs as written (exit 0, no traceback), and so does its Python
example. Paths the README leaves to the reader get small stand-ins: PARENT and path/to/checkpoint a
tiny random nemotron_h checkpoint, data.txt a short text, RECIPE (and the default recipe) a tiny
recipe; outputs (sorted/, nested/, build/...) land in a temporary working directory, in order."""

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from elastic_export.cli import main
from helpers import random_model
from train_helpers import tiny_recipe, to_toml

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = {  # first words -> why the line is not run here
    ("pip",): "installs packages (needs the network)",
    ("python", "-m", "pytest"): "the test suite itself",
    ("torchrun",): "two processes; tests/test_trainer.py::test_torchrun_two_processes_writes_the_same_format runs it",
}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def command_lines() -> list[list[str]]:
    """The README's bash lines as argument lists: continuations joined, comments dropped."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    out.append(words)
    return out


def test_readme_parsing_sees_the_commands():
    lines = command_lines()
    assert ["elastic-export", "inspect", "--preset", "nemotron-nano-v2-12b"] in lines
    assert any(w[:2] == ["elastic-export", "plan-memory"] and "49152" in w for w in lines)  # continuation joined
    assert all(w[0] in ("elastic-export", "pip", "python", "torchrun") for w in lines), lines
    assert blocks("python")


def _skip_reason(words):
    return next((why for head, why in SKIP.items() if tuple(words[:len(head)]) == head), None)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (the suite shares a small, busy machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_readme_command_runs(tmp_path, monkeypatch, one_thread):
    from engines import trt

    random_model(0, vocab_size=300).save_pretrained(tmp_path / "parent")
    (tmp_path / "data.txt").write_text("def add(a, b):\n    return a + b\n# 12 + 30 = 42\n" * 20)
    recipe = tiny_recipe(tmp_path, **{"stages": tiny_recipe(tmp_path)["stages"][:2], "train.checkpoint_every": 100})
    (tmp_path / "recipe.toml").write_text(to_toml(recipe))
    stand_in = {"PARENT": "parent", "path/to/checkpoint": "parent", "data.txt": "data.txt",
                "RECIPE": "recipe.toml", "training/recipes/default.toml": "recipe.toml"}
    trt_ok, trt_why = trt.availability(need_plugin=False)
    monkeypatch.chdir(tmp_path)
    ran, skipped = [], []
    for words in command_lines():
        why = _skip_reason(words)
        if why:
            skipped.append((" ".join(words), why))
            continue
        assert words[0] == "elastic-export", words
        args = [stand_in.get(w, w) for w in words[1:]]
        r = CliRunner().invoke(main, args)
        line = " ".join(words)
        assert "Traceback" not in r.output, f"{line}\n{r.output}"
        if "--target" in args and args[args.index("--target") + 1] == "trt" and not trt_ok:
            # documented: without TensorRT and a GPU it stops at once, naming what is missing
            assert r.exit_code == 2 and trt_why in r.output and len(r.output.strip().splitlines()) == 1, r.output
            assert not Path(args[args.index("--out") + 1]).exists()
        else:
            assert r.exit_code == 0 and r.exception is None, f"{line}\n{r.output}\n{r.exception!r}"
        ran.append(line)
    assert len(ran) >= 14 and any("train" in x for x in ran), ran
    print("skipped:", *(f"{line}: {why}" for line, why in skipped), sep="\n  ")

    # the Python example, on the same outputs (nested/ from the nest line above)
    for code in blocks("python"):
        exec(compile(code.replace("path/to/checkpoint", "parent"), "README.md", "exec"), {})
    assert (tmp_path / "out" / "config.json").is_file()
