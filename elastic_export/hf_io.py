"""Read and write Hugging Face `nemotron_h` checkpoints: config.json + safetensors (single or sharded).

Weights load only through safetensors. MoE experts are read in either layout transformers reads (one
``mixer.experts.{j}.up_proj.weight`` / ``down_proj.weight`` per expert, as NVIDIA's checkpoints and
transformers' own save_pretrained write them, or the stacked ``mixer.experts.up_proj`` [E, F, din] of
its in-memory model) and written per expert by default. Router weights stay float32 at every dtype.
 Every problem is reported as a CheckpointError or ConfigError
naming the file, the tensor and the fix. Writes go to a temporary directory that is renamed into
place, so a failed save leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError, ConfigError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# the router of a MoE layer stays float32 at every precision (transformers' _keep_in_fp32_modules_strict)
FLOAT32_KEYS = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")
EXPERT_LAYOUTS = ("per_expert", "stacked")
_EXPERT_KEY = re.compile(r"^(?P<pre>.+\.mixer\.experts)\.(?P<j>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")


def cast(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Tensor ``name`` at ``dtype`` (None: as is); integer tensors and the router keep theirs."""
    if dtype is None or not t.is_floating_point() or name.endswith(FLOAT32_KEYS):
        return t
    return t.to(dtype)


def merge_experts(entries: dict, path, stack) -> dict:
    """Per-expert entries ``...mixer.experts.{j}.up_proj.weight`` (j = 0..E-1) -> one stacked entry
    ``...mixer.experts.up_proj``: ``stack(values, key)`` merges them (tensors, or shapes). Other
    entries pass through. Refuses a gap in the expert indices and a mix of both layouts."""
    out, groups = {}, {}
    for name, value in entries.items():
        m = _EXPERT_KEY.match(name)
        if m is None:
            out[name] = value
        else:
            groups.setdefault(f"{m['pre']}.{m['proj']}", {})[int(m["j"])] = value
    for key, by_j in groups.items():
        if key in out:
            raise CheckpointError(f"holds both the stacked tensor {key!r} and per-expert tensors of it", path=path,
                                  fix="keep one layout of the experts")
        missing = sorted(set(range(max(by_j) + 1)) - set(by_j))
        if missing:
            pre, proj = key.rsplit(".", 1)
            raise CheckpointError(f"tensor {pre}.{missing[0]}.{proj}.weight is missing", path=path,
                                  fix="the checkpoint is incomplete; copy every shard again")
        out[key] = stack([by_j[j] for j in range(len(by_j))], key)
    return out


def _stack_shapes(shapes, key):
    if len({tuple(s) for s in shapes}) > 1:
        raise CheckpointError(f"the per-expert tensors of {key!r} differ in shape", fix="the weights are corrupt")
    return (len(shapes), *shapes[0])


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`merge_experts` on tensors: stacked experts -> one tensor per expert
    (own storage: safetensors refuses tensors that share memory)."""
    out = {}
    for name, t in state.items():
        pre, _, proj = name.rpartition(".")
        if pre.endswith(".mixer.experts") and proj in ("up_proj", "down_proj"):
            out.update({f"{pre}.{j}.{proj}.weight": t[j].clone() for j in range(t.shape[0])})
        else:
            out[name] = t
    return out


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}", field="dtype", fix=f"use one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checkpoint_dir(path: str | Path) -> Path:
    """Validate that ``path`` is a checkpoint directory (config.json present)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("does not exist", path=path, fix="give the path of a checkpoint directory")
    if path.is_file():
        if path.name == "config.json":
            return path.parent
        raise CheckpointError("is a file, not a checkpoint directory", path=path,
                              fix="give the directory that holds config.json")
    if not (path / "config.json").is_file():
        raise CheckpointError("is not a checkpoint: config.json is missing", path=path,
                              fix="give a directory with config.json and *.safetensors")
    return path


LM_HEAD = "lm_head.weight"


def resolve_tying(cfg: ModelConfig, tensor_names) -> ModelConfig:
    """The tying rule, stated once: lm_head is the embeddings only when the config ties them AND the
    weights hold no ``lm_head.weight``; a checkpoint that holds one projects with it.

    transformers' NemotronH never ties on load (its ``_tied_weights_keys`` is empty) and writes its own
    lm_head.weight even under ``tie_word_embeddings: true``. The config returned says what the weights
    do (``tie_word_embeddings`` false when lm_head.weight is present), so the model, slicing, nesting,
    the ONNX graphs and the engines, which all follow the config, follow the weights."""
    if cfg.tie_word_embeddings and LM_HEAD in {_canonical(n) for n in tensor_names}:
        return cfg.replace(tie_word_embeddings=False)
    return cfg


def load_config(path: str | Path) -> ModelConfig:
    """config.json of a checkpoint directory, tying resolved against its weights when it has any."""
    path = checkpoint_dir(path)
    cfg = ModelConfig.from_file(path / "config.json")
    if (path / INDEX).is_file() or any(path.glob("*.safetensors")):
        cfg = resolve_tying(cfg, weight_files(path))
    return cfg


def weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"is not a valid safetensors index ({e})", path=path / INDEX) from None
        files = {}
        for name, fname in weight_map.items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"names shard {fname!r} for {name!r}, which is missing", path=path / INDEX)
            files[name] = f
        return files
    if (path / SINGLE).is_file():
        return {name: path / SINGLE for name in _keys(path / SINGLE)}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError("holds no weights (no *.safetensors)", path=path,
                              fix="add model.safetensors, or use a config-only command such as inspect")
    return {name: f for f in shards for name in _keys(f)}


def _keys(f: Path) -> list[str]:
    try:
        with safe_open(f, "pt") as sf:
            return list(sf.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"is not a readable safetensors file ({e})", path=f,
                              fix="the file is truncated or corrupt; copy it again") from None


def _canonical(name: str) -> str:
    """Accept transformers' in-memory prefix ``model.`` as well as the on-disk ``backbone.``."""
    return "backbone." + name[len("model."):] if name.startswith("model.") else name


def read_tensors(path: Path, names_needed: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    files = weight_files(path)
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        try:
            with safe_open(f, "pt") as sf:
                for name in names:
                    out[_canonical(name)] = sf.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"could not be read ({e})", path=f,
                                  fix="the file is truncated or corrupt; copy it again") from None
    return merge_experts(out, path, lambda ts, key: torch.stack(ts))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from .model import NemotronHForCausalLM

    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_tensors(path: Path, cfg: ModelConfig, found: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the config implies is present with its shape, and nothing else is. ``found``
    may hold the experts in either layout (per expert or stacked)."""
    found = merge_experts(dict(found), path, _stack_shapes)
    expected = expected_shapes(resolve_tying(cfg, found))
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"tensor {name!r} is missing", path=path,
                                  fix="the weights do not match config.json; re-export the checkpoint")
        if tuple(found[name]) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(found[name])}, config.json implies {shape}",
                                  path=path, fix="the weights do not match config.json")
    unexpected = sorted(n for n in set(found) - set(expected) if not n.startswith("mtp."))
    if unexpected:
        attention_biases = all(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias"))
                               for n in unexpected)
        raise CheckpointError(f"unexpected tensors {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}",
                              path=path, fix="NemotronH attention has no biases (transformers ignores "
                              "attention_bias and drops them); remove them from the file" if attention_biases
                              else "the weights do not match config.json (layer types or count)")


def tensor_headers(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of all tensors, from the safetensors headers only (no data read)."""
    out = {}
    for name, f in weight_files(path).items():
        try:
            with safe_open(f, "pt") as sf:
                sl = sf.get_slice(name)
                out[_canonical(name)] = (tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"could not be read ({e})", path=f,
                                  fix="the file is truncated or corrupt; copy it again") from None
    return out


def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load an HF `nemotron_h` checkpoint (or our sliced checkpoints) as a NemotronHForCausalLM."""
    from .model import NemotronHForCausalLM

    path = checkpoint_dir(path)
    cfg = load_config(path)
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors = read_tensors(path)
    check_tensors(path, cfg, {k: tuple(v.shape) for k, v in tensors.items()})  # cfg's tying is resolved
    state = {}
    for name in expected:
        state[name] = cast(name, tensors[name], dtype).to(device)
    model.load_state_dict(state, assign=True)
    return model


def save_pretrained(model, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int | None = None, extra_files: dict[str, str] | None = None,
                    expert_layout: str = "per_expert") -> Path:
    """Write config.json and safetensors (sharded above ``max_shard_bytes``) atomically. MoE experts
    are written ``per_expert`` (as NVIDIA's checkpoints and transformers write them) or ``stacked``."""
    path = Path(path)
    if expert_layout not in EXPERT_LAYOUTS:
        raise ConfigError(f"unknown expert layout {expert_layout!r}", field="expert_layout",
                          fix=f"use one of {', '.join(EXPERT_LAYOUTS)}")
    if model.config.head_order != "group_contiguous":
        # HF readers assume group-contiguous heads and would silently misread rank-major weights:
        # write the HF order (the full budget, sliced), which computes the same logits.
        from .elastic import full_subnet
        from .slicing import slice_budget

        model = slice_budget(model, full_subnet(model.config))
    cfg = model.config
    state = {}
    sd = model.state_dict()
    if model.lm_head is None:
        # transformers' NemotronH does not tie lm_head to the embeddings on load (its
        # _tied_weights_keys is empty), so tied checkpoints carry an explicit copy for it.
        sd[LM_HEAD] = sd["backbone.embeddings.weight"].clone()
    for name, t in sd.items():
        state[name] = cast(name, t.detach(), dtype).contiguous().cpu()
    if expert_layout == "per_expert":
        state = split_experts(state)
    saved_dtype = state["backbone.embeddings.weight"].dtype
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(dtype_name(saved_dtype)), indent=2) + "\n")
        write_safetensors(state, tmp, max_shard_bytes)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return path


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int | None = None) -> None:
    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, str(directory / SINGLE), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2) + "\n")


def umask() -> int:
    """This process's umask (read from /proc where it can be, so no other thread sees it change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain mkdir / open would: 0o777 (directories
    and executables) or 0o666 (files), less the umask. ``tempfile.mkdtemp`` makes 0o700 and
    safetensors writes 0o600; renamed into place, other users (or a container running as another
    uid) could not read our outputs."""
    mask = umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        full = 0o777 if p.is_dir() or mode & 0o111 else 0o666
        os.chmod(p, full & ~mask)


class atomic_dir:
    """``with atomic_dir(final) as tmp:`` write into tmp; on success tmp replaces final, with the
    ordinary permissions of :func:`plain_permissions`. Every output directory is written this way."""

    def __init__(self, final: str | Path, overwrite: bool = True):
        self.final = Path(final)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.final.exists() and not self.overwrite:
            raise CheckpointError("already exists", path=self.final, fix="choose another path or pass --overwrite")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        plain_permissions(self.tmp)  # private while written, readable as the umask allows once in place
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        return False


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename: readers never see half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
