"""torchrun worker for tests/test_fsdp.py and benchmarks/fsdp_gpu_check.py: ``RECIPE.toml@OUT[:STOP] ...``:
each run in turn, in one process group (started here, so no run tears it down: gloo on the CPU, NCCL on
GPUs); STOP: stop after that step without a nested checkpoint, as if killed (a later run on the same OUT
resumes from its checkpoint)."""

import os
import sys

import torch
import torch.distributed as dist

from training.recipe import load_recipe
from training.trainer import train

if __name__ == "__main__":
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    for arg in sys.argv[1:]:
        recipe, _, rest = arg.partition("@")
        out, _, stop = rest.partition(":")
        train(load_recipe(recipe), out=out, progress=False, stop_after_step=int(stop) if stop else None)
    dist.destroy_process_group()
