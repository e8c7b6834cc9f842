"""Shared pytest set-up.

Triton's interpreter: Triton decides at import/decoration time whether `@triton.jit` functions are
compiled or interpreted (its own `tl.sum`, `tl.max`, ... included), so TRITON_INTERPRET must be set
before anything imports triton. Without CUDA (CI) every kernel runs through the interpreter; on a GPU
machine the variable is left alone and kernels compile.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
