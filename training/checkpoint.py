"""The resumable training state of a run (the nested checkpoint itself is elastic_export.nested's).

Training state (``OUT/checkpoint/``, safetensors + JSON, written atomically by rank 0): model, router and optimizer
state, the global step, RNG states, the depth ranking and the evaluations so far. Everything random
in a step is a function of (seed, step), so this is all an exact resume needs. The frozen teacher is
written once to ``OUT/teacher/`` when elastification starts.

Under FSDP2 (``train.parallel = "fsdp2"``) the same directories add ``sharded/``: the sharded tensors
(model, AdamW moments, router), one safetensors file per rank written by torch.distributed.checkpoint
(training/parallel.py); state.json keeps the rest. This is training state only: the nested checkpoint a
run ends with is the same single safetensors file whatever the process count or strategy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from elastic_export.errors import CheckpointError
from elastic_export.hf_io import atomic_dir


# ---- training state -----------------------------------------------------------------------------
# state.safetensors holds every tensor of the state; state.json the structure around them, with each
# tensor replaced by {"__tensor__": key}. Tuples and dicts with non-string keys (optimizer states are
# keyed by parameter index) are tagged so they come back as they went in. No pickle anywhere.

def _encode(obj, tensors: dict[str, torch.Tensor], seen: set[int]):
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        t = obj.detach().cpu().contiguous()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share storage: copy only those (a view, or storage seen before)
        if storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, seen) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state holds a {type(obj).__name__}, which has no safetensors/JSON form")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def write_state(directory: Path, state: dict) -> None:
    """Write ``state.safetensors`` + ``state.json`` into the existing ``directory``."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, set())
    save_file(tensors, str(directory / "state.safetensors"))
    (directory / "state.json").write_text(json.dumps(structure))


def save_state(directory: str | Path, state: dict) -> None:
    """Atomically replace ``directory`` with one holding ``state.safetensors`` + ``state.json``."""
    with atomic_dir(directory) as tmp:
        write_state(tmp, state)


def load_state(directory: str | Path) -> dict | None:
    directory = Path(directory)
    f, meta = directory / "state.safetensors", directory / "state.json"
    if not f.is_file():
        if (directory / "state.pt").is_file():
            raise CheckpointError("is a training state of an older version (a pickle file, which is never loaded)",
                                  path=directory / "state.pt", fix="delete the checkpoint directory to start over")
        return None
    try:
        return _decode(json.loads(meta.read_text()), load_file(str(f)))
    except Exception as e:  # a truncated file cannot exist (atomic writes), but say so if it does
        raise CheckpointError(f"could not be read ({e})", path=directory, fix="delete it to start over") from None


def rng_states() -> dict:
    import random

    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s: dict) -> None:
    import random

    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


