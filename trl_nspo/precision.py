"""Which precision the hardware runs fast: the bf16 decision shared by `NSPOConfig`, the demo and the benchmarks."""

import torch
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available


def accelerator_available() -> bool:
    """Whether training would run on an accelerator (CUDA, XPU, MPS, NPU, TPU…) rather than on the CPU."""
    return torch.accelerator.is_available() or is_torch_xla_available()


def cpu_supports_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-bf16 or AMX): with them bf16 autocast is faster than
    float32; without them bf16 is emulated, and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_supported() -> bool:
    """bf16 autocast for training: on an accelerator that supports it, or, without one, on a CPU with bf16
    instructions."""
    return is_torch_bf16_gpu_available() if accelerator_available() else cpu_supports_bf16()
