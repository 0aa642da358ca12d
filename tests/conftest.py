"""Session setup shared by every test module.

Triton's interpreter runs the Triton backend's kernels on CPU tensors, which is how they are tested on
machines without a GPU; it must be chosen before anything imports triton (torch.compile does), so it is
set here, first. On a CUDA machine the kernels are compiled and run on the GPU instead.
"""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
