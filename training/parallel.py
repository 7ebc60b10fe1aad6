"""FSDP2 for the trainer (``train.parallel = "fsdp2"``): sharding, full-state gathers, sharded training state.

Sharding (torch's own ``torch.distributed.fsdp.fully_shard``): one unit per decoder layer, then the root
(embeddings, final norm, lm_head), for the student and for the frozen teacher (no gradients). A budget's
forward takes sub-width views of a layer's weights; the model runs each layer through its own call
(``model.layerwise``), so the views are taken inside the layer's unit, of its unsharded parameters, and
their gradients reach the unsharded gradient FSDP2 reduce-scatters. On a GPU with bf16 the units gather
bf16 parameters and reduce float32 gradients (``MixedPrecisionPolicy``); the shards, gradients and AdamW
moments stay float32. The router is small and stays replicated; the trainer averages its gradients.

Only rank 0 ever holds a whole model: it builds or loads the parent and its weights are broadcast into
the other ranks' shards (:func:`sharded_model`); :func:`gather` brings the full float32 weights back to
rank 0's CPU (importance at the elastic start, evaluation, the nested checkpoint).

Sharded state (:func:`save_sharded` / :func:`load_sharded`): torch.distributed.checkpoint with its
safetensors storage (``HuggingFaceStorageWriter(save_distributed=True)``): every rank writes its own
shard ``sharded/shard-0000r-model-00001-of-00001.safetensors``, and the offsets of each piece are JSON in
the safetensors header, so a checkpoint loads on another process count. No pickle: DCP's default
``FileSystemWriter`` pickles its ``.metadata`` file, this storage writes none (the reader rebuilds the
layout from the headers). It holds tensors only; the rest of the state is the JSON of checkpoint.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

GROUP_OWNED = "_elastic_export_owns_group"


def init_group(world: int, device: torch.device) -> bool:
    """Start the default process group if none is (torchrun's env, or one process on its own); returns
    whether this call started it (then the caller destroys it)."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 or "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:  # one process without torchrun: a group of one over an in-memory store
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def make_mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def mp_policy(bf16: bool):
    """bf16 all-gathered parameters, float32 gradient reductions (GPU); float32 throughout otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()


def shard(model: nn.Module, mesh, mp) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (what is left: embeddings, norm_f, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    for blk in model.backbone.layers:
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.layerwise = True
    return model


def empty_sharded(cfg, mesh, mp, device: torch.device, trainable: bool = True) -> nn.Module:
    """A sharded NemotronHForCausalLM of ``cfg`` with uninitialized shards (built on the meta device, so no
    rank ever allocates the whole model)."""
    from elastic_export.model import NemotronHForCausalLM

    with torch.device("meta"):
        m = NemotronHForCausalLM(cfg)
    m.requires_grad_(trainable)
    shard(m, mesh, mp)
    m.to_empty(device=device)
    return m


def sharded_model(cfg, mesh, mp, device: torch.device, source: nn.Module | None = None,
                  trainable: bool = True) -> nn.Module:
    """A sharded model of ``cfg``; ``source`` (rank 0's plain model; None on the other ranks) is broadcast
    into the shards tensor by tensor. Every rank calls it; without any ``source`` the shards stay empty."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    m = empty_sharded(cfg, mesh, mp, device, trainable)
    has = torch.tensor([source is not None], dtype=torch.int64, device=_comm_device(device))
    dist.broadcast(has, 0)
    if bool(has):
        full = source.state_dict() if dist.get_rank() == 0 else {}
        set_model_state_dict(m, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return m


def sharded_copy(src: nn.Module, mesh, mp, device: torch.device, trainable: bool = False) -> nn.Module:
    """A sharded copy of sharded ``src`` (the frozen teacher): each rank copies its own shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    m = empty_sharded(src.config, mesh, mp, device, trainable)
    set_model_state_dict(m, get_model_state_dict(src))
    return m


def gather(model: nn.Module) -> nn.Module | None:
    """Rank 0: a plain float32 copy of sharded ``model`` on the CPU; the other ranks: None. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from elastic_export.model import NemotronHForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = NemotronHForCausalLM(model.config)
    plain.load_state_dict(full, assign=True)
    return plain.train(model.training)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard; a plain tensor is all of it)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value as a plain tensor (e.g. clip_grad_norm_'s total norm)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 0's ``tensors`` on every rank (CPU), sent as one safetensors blob (no pickle)."""
    from safetensors.torch import load, save

    dev = _comm_device(device)
    blob = torch.frombuffer(bytearray(save(tensors)), dtype=torch.uint8) if dist.get_rank() == 0 else None
    n = torch.tensor([0 if blob is None else blob.numel()], dtype=torch.int64, device=dev)
    dist.broadcast(n, 0)
    buf = blob.to(dev) if blob is not None else torch.empty(int(n), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, 0)
    return load(bytes(buf.cpu().numpy()))


def all_gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (one small int64 all-gather)."""
    dev = _comm_device(device)
    t = torch.tensor(values, dtype=torch.int64, device=dev)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


# ---- sharded state ------------------------------------------------------------------------------

def save_sharded(directory: str | Path, tensors: dict, write_rest=None) -> None:
    """Replace ``directory`` with one holding ``sharded/`` (DCP, every rank its shard of ``tensors``) plus
    what ``write_rest(tmp_dir)`` writes on rank 0. Collective. Written in ``.NAME.partial`` beside it and
    swapped in by rank 0 once every rank is done: a kill at any point leaves the previous one whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from elastic_export.hf_io import plain_permissions

    final = Path(directory)
    tmp = final.with_name(f".{final.name}.partial")
    main = dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / "sharded"), save_distributed=True))
    dist.barrier()
    if main:
        if write_rest is not None:
            write_rest(tmp)
        plain_permissions(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    dist.barrier()


def load_sharded(directory: str | Path, tensors: dict) -> None:
    """Fill ``tensors`` (the structure save_sharded was given, DTensors sharded as this run shards them) in
    place from ``directory/sharded``. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from elastic_export.errors import CheckpointError

    src = Path(directory) / "sharded"
    if not any(src.glob("*.safetensors")):
        raise CheckpointError("has no sharded training state (sharded/*.safetensors)", path=directory,
                              fix="delete it to start over")
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(src)))
