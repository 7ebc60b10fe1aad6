"""Test session setup.

- tests/ on sys.path for the shared helpers; no hub access; quiet transformers.
- Without CUDA, Triton kernels run in Triton's interpreter; TRITON_INTERPRET must be set before
  triton is first imported (any test module may import it), hence here.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
