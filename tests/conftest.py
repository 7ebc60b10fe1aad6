"""Test session setup. Without CUDA, Triton kernels run in Triton's interpreter; TRITON_INTERPRET must
be set before triton is first imported (any test module may import it), hence here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
