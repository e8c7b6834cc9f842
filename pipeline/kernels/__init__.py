"""Triton kernels with PyTorch references; `dispatch` picks one per call."""
