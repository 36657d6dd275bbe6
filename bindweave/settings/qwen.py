"""Qwen2.5-VL settings (``qwen.*``): where the weights are and how to hold them (stages 1 and 2,
bindweave/encoders/qwen.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bindweave.errors import BindWeaveInputError

if TYPE_CHECKING:
    import torch

QWEN_DTYPES = ("auto", "bfloat16", "float16", "float32")
QWEN_ATTENTION = ("sdpa", "flash_attention_2", "eager")


@dataclass(frozen=True)
class QwenSettings:
    """Where the Qwen2.5-VL weights are and how to hold them (conf/qwen/*.yaml)."""

    path: str | None = None  # local folder or HF repo id
    revision: str | None = None
    tiny_root: str | None = None  # set: write (once) and use the tiny random Qwen there instead
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto: the current CUDA device, else CPU
    attn_implementation: str = "sdpa"  # or flash_attention_2 where installed, eager
    gpu_memory_gib: float | None = None  # the GPU memory this process may use (null: all; 24: as on a 24 GB card)

    def __post_init__(self):
        problems = []
        if self.dtype not in QWEN_DTYPES:
            problems.append(f"qwen.dtype={self.dtype} is not one of {', '.join(QWEN_DTYPES)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            problems.append(f"qwen.device={self.device} is not auto, cpu, cuda or cuda:N")
        if self.attn_implementation not in QWEN_ATTENTION:
            problems.append(f"qwen.attn_implementation={self.attn_implementation} is not one of "
                            f"{', '.join(QWEN_ATTENTION)}")
        if self.gpu_memory_gib is not None and not self.gpu_memory_gib > 0:
            problems.append(f"qwen.gpu_memory_gib={self.gpu_memory_gib} must be > 0 GiB, or null for the whole GPU")
        if problems:
            raise BindWeaveInputError("; ".join(problems))

    def require_weights(self) -> None:
        if not self.path and not self.tiny_root:
            raise BindWeaveInputError("qwen.path must name the Qwen2.5-VL weights (a folder or a HF repo id): use "
                                      "qwen=qwen2_5_vl_7b [qwen.path=weights/Qwen2.5-VL-7B-Instruct], or qwen=tiny")

    def device_type(self) -> str:
        """cuda or cpu, without touching a GPU (auto: CUDA if present)."""
        import torch  # here, not at the top: module docstring of bindweave.settings

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(self.device).type

    def resolved_device(self) -> torch.device:
        import torch

        if self.device != "auto":
            return torch.device(self.device)
        if self.device_type() == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.float32 if device.type == "cpu" else torch.bfloat16
        return getattr(torch, self.dtype)
