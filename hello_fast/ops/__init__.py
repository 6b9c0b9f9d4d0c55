"""Public ops of hello_fast: each dispatches to csrc (C++/CUDA), Triton or its PyTorch reference."""
from hello_fast.ops._backend import BACKENDS, extension_status
from hello_fast.ops.augment_mix import (
    augment_mix,
    augment_mix_reference,
    sample_augment_params,
)
from hello_fast.ops.lora_linear import (
    lora_linear,
    lora_linear_multi,
    lora_linear_multi_reference,
    lora_linear_reference,
)
from hello_fast.ops.soft_label_loss import soft_label_loss, soft_label_loss_reference

__all__ = [
    "BACKENDS", "augment_mix", "augment_mix_reference", "extension_status", "lora_linear", "lora_linear_multi",
    "lora_linear_multi_reference", "lora_linear_reference", "sample_augment_params",
    "soft_label_loss", "soft_label_loss_reference",
]
