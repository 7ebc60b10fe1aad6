import re

import torch

from elastic_export.tokenizer import ByteTokenizer
from training.data import Mixture, Source, stdlib_files
from elastic_export.tasks import Task, evaluate, make_tasks, parse_answer


def test_tasks_have_correct_worked_steps():
    for t in make_tasks(200, "mixed", seed=3):
        total = None
        for a, op, b, c in re.findall(r"(\d+)([+\-*])(\d+)=(\d+)", t.steps):
            a, b, c = int(a), int(b), int(c)
            assert total is None or a == total
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op] and 0 <= c <= 99
            total = c
        assert total == t.answer == parse_answer(t.text.split("A:")[1])
    short, long = make_tasks(50, "short"), make_tasks(50, "long")
    assert max(t.steps.count("=") for t in short) <= 3 and min(t.steps.count("=") for t in long) >= 6


class Oracle(torch.nn.Module):
    """Emits a fixed script per row (ignores its input): exercises left padding and stopping."""

    def __init__(self, scripts, vocab):
        super().__init__()
        self.scripts, self.vocab, self.t = scripts, vocab, 0
        self.w = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return torch.device("cpu")

    def new_cache(self):
        return None

    def forward(self, ids, subnet=None, cache=None, attention_mask=None, last_only=False):
        out = torch.full((ids.shape[0], 1, self.vocab), -1e9)
        for i, s in enumerate(self.scripts):
            out[i, 0, s[min(self.t, len(s) - 1)]] = 0
        self.t += 1
        return out


def test_exact_match_evaluator():
    tok = ByteTokenizer()
    tasks = [Task("1, +2", "1+2=3.", 3), Task("5, -1, *2", "5-1=4, 4*2=8.", 8), Task("2, +2", "2+2=4.", 4)]
    answers = [" 1+2=3. #### 3\n", " 5-1=4, 4*2=8. #### 8\n", " 2+2=4. #### 5\n"]  # the last is wrong
    model = Oracle([tok.encode(a) for a in answers], tok.vocab_size)
    assert abs(evaluate(model, tok, tasks) - 2 / 3) < 1e-9


def test_stdlib_corpus_and_deterministic_windows(tmp_path):
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("test" in f.parts[-2:-1] for f in files)
    tok = ByteTokenizer()
    (tmp_path / "a.jsonl").write_text('{"text": "hello world, hello world"}\n' * 20)
    src = Source({"kind": "jsonl", "path": str(tmp_path / "a.jsonl"), "field": "text"}, tok, 0, 0.1)
    tasks = Source({"kind": "tasks", "count": 50, "variant": "short"}, tok, 0, 0.0)
    mix = Mixture([src, tasks], seed=4)
    a, b = mix.batch(range(10), 16), mix.batch(range(10), 16)
    assert a.shape == (10, 17) and torch.equal(a, b)
    assert len(src.held) > 0 and tok.decode(src.train[1:12].tolist()) == "hello world"
    import numpy as np

    np.save(tmp_path / "t.npy", np.arange(100) % 50)
    t = Source({"kind": "tokens", "path": str(tmp_path / "t.npy")}, tok, 0, 0.1)
    assert len(t.train) == 90 and len(t.held) == 10


def test_hf_tokenizer_json_source(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, "hello": 4, "world": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    from elastic_export.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "c.txt").write_text("hello world hello")
    src = Source({"kind": "text", "path": str(tmp_path / "c.txt")}, tok, 0, 0.0)
    assert src.train.tolist() == [1, 4, 5, 4, 2]


def test_answer_loss_scores_only_the_answer():
    from elastic_export.tasks import answer_loss

    tok = ByteTokenizer()

    class Uniform(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, ids, subnet=None):
            return torch.zeros(ids.shape[0], ids.shape[1], tok.vocab_size)

    loss = answer_loss(Uniform(), tok, make_tasks(5, "mixed"), batch_size=2)
    assert abs(loss - torch.log(torch.tensor(float(tok.vocab_size))).item()) < 1e-5
