"""torchrun worker for tests/test_fsdp.py: ``RECIPE.toml@OUT[:STOP] ...``: each run in turn, in one process
group (started here, so no run tears it down); STOP: stop after that step without a nested checkpoint, as
if killed (a later run on the same OUT resumes from its checkpoint)."""

import sys

import torch.distributed as dist

from training.recipe import load_recipe
from training.trainer import train

if __name__ == "__main__":
    dist.init_process_group("gloo")
    for arg in sys.argv[1:]:
        recipe, _, rest = arg.partition("@")
        out, _, stop = rest.partition(":")
        train(load_recipe(recipe), out=out, progress=False, stop_after_step=int(stop) if stop else None)
    dist.destroy_process_group()
