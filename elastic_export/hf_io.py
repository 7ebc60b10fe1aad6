"""Read and write Hugging Face `nemotron_h` checkpoints: config.json + safetensors (single or sharded).

Weights load only through safetensors, memory-mapped (:mod:`elastic_export.safetensors_io`): a
loaded model's tensors are views of the files' pages wherever the dtype is unchanged, and every write
streams, one tensor produced and written at a time. MoE experts are read in either layout transformers reads (one
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .safetensors_io import SafetensorsFile, read_header, write_file

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
    return list(read_header(f)[0])


def _canonical(name: str) -> str:
    """Accept transformers' in-memory prefix ``model.`` as well as the on-disk ``backbone.``."""
    return "backbone." + name[len("model."):] if name.startswith("model.") else name


class CheckpointReader:
    """The tensors of a checkpoint by the model's names, one at a time, from memory-mapped files.

    ``files`` maps each stored name to its file (:func:`weight_files`); names are canonical
    (``backbone.``) and per-expert MoE tensors are read stacked, as the model holds them (stacking
    is the one copy: one stacked tensor at a time, whose sources' pages are dropped behind it).
    ``writable``: copy-on-write maps, for tensors handed to a model that may train; otherwise
    read-only, and :meth:`drop_pages` returns what was read to the page cache."""

    def __init__(self, files: Mapping[str, Path], path: Path, writable: bool = False):
        self.path = path
        self.files = {f: SafetensorsFile(f, writable) for f in dict.fromkeys(files.values())}
        self._where = {_canonical(n): (self.files[f], n) for n, f in files.items()}
        self._parts = merge_experts({n: n for n in self._where}, path, lambda names, key: list(names))
        self._specs = None

    @classmethod
    def of_dir(cls, path: str | Path, writable: bool = False) -> "CheckpointReader":
        path = checkpoint_dir(path)
        return cls(weight_files(path), path, writable)

    @classmethod
    def of_file(cls, f: str | Path, writable: bool = False) -> "CheckpointReader":
        f = Path(f)
        return cls({n: f for n in _keys(f)}, f, writable)

    def specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """name -> (dtype, shape), the experts stacked; from the headers alone."""
        if self._specs is None:
            out = {}
            for name, parts in self._parts.items():
                if isinstance(parts, str):
                    i = self._info(parts)
                    out[name] = (i.dtype, i.shape)
                    continue
                infos = [self._info(p) for p in parts]
                if len({(i.dtype, i.shape) for i in infos}) > 1:
                    raise CheckpointError(f"the per-expert tensors of {name!r} differ in shape or dtype",
                                          path=self.path, fix="the weights are corrupt")
                out[name] = (infos[0].dtype, (len(infos), *infos[0].shape))
            self._specs = out
        return self._specs

    def _info(self, name: str):
        f, stored = self._where[name]
        return f.infos[stored]

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name``: a view of its file, or (per-expert experts) a stacked copy."""
        parts = self._parts[name]
        try:
            if isinstance(parts, str):
                f, stored = self._where[parts]
                return f.tensor(stored)
            out = torch.stack([self._where[p][0].tensor(self._where[p][1]) for p in parts])
            for p in parts:  # nobody else holds these views: give their pages back now
                f, stored = self._where[p]
                f.drop_pages([stored])
            return out
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"could not be read ({e})", path=self.path,
                                  fix="the file is truncated or corrupt; copy it again") from None

    def drop_pages(self, names=None) -> None:
        """Return the pages read so far (of ``names``' files only, else all) to the page cache."""
        if names is None:
            for f in self.files.values():
                f.drop_pages()
            return
        for name in names:
            parts = self._parts[name]
            for p in [parts] if isinstance(parts, str) else parts:
                f, stored = self._where[p]
                f.drop_pages([stored])


def read_tensors(path: Path, names_needed: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (views of copy-on-write maps; stacked experts copied)."""
    reader = CheckpointReader.of_dir(path, writable=True)
    return {name: reader.tensor(name) for name in reader.specs()}


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
    from .safetensors_io import NAMES

    out = {}
    headers = {}
    for name, f in weight_files(path).items():
        if f not in headers:
            headers[f] = read_header(f)[0]
        i = headers[f][name]
        out[_canonical(name)] = (i.shape, NAMES[i.dtype])
    return out


def open_checkpoint(path: str | Path, writable: bool = False) -> tuple[ModelConfig, CheckpointReader]:
    """The config of an HF checkpoint directory (tying resolved) and a reader of its weights, every
    tensor checked against the config from the headers alone (no weight read yet)."""
    path = checkpoint_dir(path)
    cfg = load_config(path)
    reader = CheckpointReader.of_dir(path, writable)
    check_tensors(path, cfg, {k: shape for k, (_, shape) in reader.specs().items()})  # cfg's tying is resolved
    return cfg, reader


def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         writable: bool = True):
    """Load an HF `nemotron_h` checkpoint (or our sliced checkpoints) as a NemotronHForCausalLM.

    Tensors whose dtype and device do not change are views of the memory-mapped files (resident as
    page-cache pages, shared with other processes reading them); cast or moved ones are copied one
    at a time, their source pages dropped behind them. ``writable=False`` maps the files read-only,
    for callers that never write the weights (a write is then a fault)."""
    cfg, reader = open_checkpoint(path, writable)
    return model_from(cfg, reader, dtype, device)


def model_from(cfg: ModelConfig, reader: CheckpointReader, dtype=None, device="cpu"):
    """A NemotronHForCausalLM of ``cfg`` on the tensors of ``reader`` (see :func:`load`)."""
    from .model import NemotronHForCausalLM

    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    names = list(model.state_dict())
    model.load_state_dict(assign_state(reader, names, parse_dtype(dtype), device), assign=True)
    return model


def reader_entries(cfg: ModelConfig, reader: CheckpointReader) -> dict[str, "Lazy"]:
    """The model's tensors (names as its state_dict) as lazy entries read from ``reader`` when written."""
    specs = reader.specs()
    return {n: Lazy(*specs[n], lambda n=n: reader.tensor(n)) for n in expected_shapes(cfg)}


def assign_state(reader: CheckpointReader, names, dtype: torch.dtype | None, device) -> dict[str, torch.Tensor]:
    """name -> tensor for ``load_state_dict(assign=True)``: views where nothing changes, else one copy
    at a time (the source's pages dropped once copied)."""
    state = {}
    for name in names:
        t = reader.tensor(name)
        state[name] = cast(name, t, dtype).to(device)
        if state[name] is not t:
            reader.drop_pages([name])
        del t
    return state


@dataclass(frozen=True)
class Lazy:
    """A tensor to be made when it is written: its dtype, shape and the function that makes it."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


def as_lazy(t: torch.Tensor) -> Lazy:
    return Lazy(t.dtype, tuple(t.shape), lambda: t.detach())


def lazy_entries(build: Callable, model) -> dict[str, Lazy]:
    """``build(model)`` -> {name: () -> tensor}, run one function at a time on a probe twin of
    ``model`` (:func:`probe_twin`) for the dtypes and shapes, and on ``model`` for the functions that
    make the tensors."""
    specs = {}
    for n, f in build(probe_twin(model)).items():
        t = f()
        specs[n] = (t.dtype, tuple(t.shape))
        del t
    return {n: Lazy(*specs[n], f) for n, f in build(model).items()}


def probe_twin(model):
    """The same model (config, dtypes, shapes) whose weights hold no memory: each is one zero
    broadcast to its shape (a stride-0 CPU view). Functions of its weights give their results' dtypes
    and shapes, allocating only the one result in flight and reading nothing of ``model``'s. (Not the
    meta device: torch's first meta ``cat`` imports its Python meta kernels, sympy and ~900 modules,
    ~150 MB of a command's resident memory.)"""
    from .model import NemotronHForCausalLM

    with torch.device("meta"):
        twin = NemotronHForCausalLM(model.config)
    twin.load_state_dict({k: zeros_view(v.dtype, v.shape) for k, v in model.state_dict().items()}, assign=True)
    return twin.train(model.training)


def zeros_view(dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor of zeros of ``shape`` holding one element (stride 0 on every axis)."""
    return torch.zeros((), dtype=dtype).expand(tuple(shape))


def meta_twin(model):
    """The same model (config, dtypes, shapes) on the meta device: structure without memory (no
    operations should run on it, see :func:`probe_twin`)."""
    from .model import NemotronHForCausalLM

    with torch.device("meta"):
        twin = NemotronHForCausalLM(model.config)
    # torch.empty, not empty_like: empty_like of a meta tensor runs torch's Python reference (sympy)
    twin.load_state_dict({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()},
                         assign=True)
    return twin.train(model.training)


def cast_lazy(name: str, e: Lazy, dtype: torch.dtype | None) -> Lazy:
    out = cast(name, torch.empty(0, dtype=e.dtype), dtype).dtype
    return e if out == e.dtype else Lazy(out, e.shape, lambda: cast(name, e.make(), dtype))


def split_lazy(entries: dict[str, Lazy]) -> dict[str, Lazy]:
    """:func:`split_experts` on lazy entries: each stacked expert tensor is made once, held until its
    last expert is written (file order keeps one layer's experts together), and dropped."""
    out: dict[str, Lazy] = {}
    for name, e in entries.items():
        pre, _, proj = name.rpartition(".")
        if not (pre.endswith(".mixer.experts") and proj in ("up_proj", "down_proj")):
            out[name] = e
            continue
        held = {"left": e.shape[0]}

        def part(j, e=e, held=held):
            if "t" not in held:
                held["t"] = e.make()
            t = held["t"][j]
            held["left"] -= 1
            if held["left"] == 0:
                del held["t"]
            return t

        for j in range(e.shape[0]):
            out[f"{pre}.{j}.{proj}.weight"] = Lazy(e.dtype, e.shape[1:], lambda j=j, part=part: part(j))
    return out


def model_entries(model) -> dict[str, Lazy]:
    """The state dict of ``model`` as lazy entries (its tensors as they are; refuses meta tensors)."""
    out = {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} has no data (meta device)", field="model",
                                  fix="load or initialize the weights before saving")
        out[name] = as_lazy(t)
    return out


def save_pretrained(model, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int | None = None, extra_files: dict[str, str] | None = None,
                    expert_layout: str = "per_expert", after: Callable[[str], None] | None = None) -> Path:
    """Write config.json and safetensors (sharded above ``max_shard_bytes``) atomically, one tensor
    at a time. MoE experts are written ``per_expert`` (as NVIDIA's checkpoints and transformers write
    them) or ``stacked``. ``after(name)``: called once each tensor is written (e.g. to drop the pages
    of a memory-mapped source)."""
    if model.config.head_order != "group_contiguous":
        # HF readers assume group-contiguous heads and would silently misread rank-major weights:
        # write the HF order (the full budget, sliced), which computes the same logits.
        from .elastic import full_subnet
        from .slicing import slice_entries, sliced_config

        sub = full_subnet(model.config)
        return save_entries(sliced_config(model.config, sub), slice_entries(model, sub), path, dtype,
                            max_shard_bytes, extra_files, expert_layout, after)
    return save_entries(model.config, model_entries(model), path, dtype, max_shard_bytes, extra_files,
                        expert_layout, after)


def save_entries(cfg: ModelConfig, entries: dict[str, Lazy], path: str | Path, dtype: torch.dtype | None = None,
                 max_shard_bytes: int | None = None, extra_files: dict[str, str] | None = None,
                 expert_layout: str = "per_expert", after: Callable[[str], None] | None = None) -> Path:
    """:func:`save_pretrained` of a config and its (lazy) state, group-contiguous heads."""
    path = Path(path)
    if expert_layout not in EXPERT_LAYOUTS:
        raise ConfigError(f"unknown expert layout {expert_layout!r}", field="expert_layout",
                          fix=f"use one of {', '.join(EXPERT_LAYOUTS)}")
    entries = dict(entries)
    if LM_HEAD not in entries and cfg.tie_word_embeddings:
        # transformers' NemotronH does not tie lm_head to the embeddings on load (its
        # _tied_weights_keys is empty), so tied checkpoints carry an explicit copy for it.
        entries[LM_HEAD] = entries["backbone.embeddings.weight"]
    entries = {name: cast_lazy(name, e, dtype) for name, e in entries.items()}
    if expert_layout == "per_expert":
        entries = split_lazy(entries)
    saved_dtype = entries["backbone.embeddings.weight"].dtype
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(dtype_name(saved_dtype)), indent=2) + "\n")
        write_safetensors(entries, tmp, max_shard_bytes, after)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return path


def write_safetensors(state: Mapping[str, torch.Tensor | Lazy], directory: Path, max_shard_bytes: int | None = None,
                      after: Callable[[str], None] | None = None) -> None:
    """model.safetensors, or shards of at most ``max_shard_bytes`` (in the order of ``state``) with
    the HF index; each tensor made and written one at a time (the bytes safetensors' save_file writes)."""
    meta = {"format": "pt"}
    state = {n: e if isinstance(e, Lazy) else as_lazy(e) for n, e in state.items()}

    def nbytes(e: Lazy) -> int:
        n = e.dtype.itemsize
        for s in e.shape:
            n *= s
        return n

    total = sum(nbytes(e) for e in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        shards = [list(state)]
    else:
        shards, size = [[]], 0
        for name, e in state.items():
            if shards[-1] and size + nbytes(e) > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes(e)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(directory / fname, {n: (state[n].dtype, state[n].shape) for n in names},
                   lambda n: state[n].make(), meta, after)
        weight_map.update({n: fname for n in names})
    if len(shards) > 1:
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
