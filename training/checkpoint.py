"""The resumable training state of a run (the nested checkpoint itself is elastic_export.nested's).

Training state (``OUT/checkpoint/``, written atomically by rank 0): model, router and optimizer
state, the global step, RNG states, the depth ranking and the evaluations so far. Everything random
in a step is a function of (seed, step), so this is all an exact resume needs. The frozen teacher is
written once to ``OUT/teacher/`` when elastification starts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from elastic_export.errors import CheckpointError
from elastic_export.hf_io import atomic_dir


# ---- training state -----------------------------------------------------------------------------

def save_state(directory: str | Path, state: dict) -> None:
    """Atomically replace ``directory`` with one holding ``state.pt``."""
    with atomic_dir(directory) as tmp:
        torch.save(state, tmp / "state.pt")


def load_state(directory: str | Path) -> dict | None:
    f = Path(directory) / "state.pt"
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated file cannot exist (atomic writes), but say so if it does
        raise CheckpointError(f"could not be read ({e})", path=f, fix="delete it to start over") from None


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


