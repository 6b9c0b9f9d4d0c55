"""Triton kernels of hello_fast, installed as hello_fast.kernels; each has a PyTorch reference in hello_fast.ops."""
