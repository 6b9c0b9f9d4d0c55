"""Public ops of hello_fast: each dispatches to csrc (C++/CUDA), Triton or its PyTorch reference."""
from hello_fast.ops._backend import BACKENDS, extension_status
from hello_fast.ops.soft_label_loss import soft_label_loss, soft_label_loss_reference

__all__ = ["BACKENDS", "extension_status", "soft_label_loss", "soft_label_loss_reference"]
