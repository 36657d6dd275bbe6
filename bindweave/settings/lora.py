"""LoRA settings (``model.loras``: a list, stacked in order): which adapter file is merged into the
DiT at load time, and how strongly (bindweave/model/lora.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bindweave.errors import BindWeaveInputError


@dataclass(frozen=True)
class LoraSettings:
    """``path``: a safetensors LoRA for Wan2.1-I2V-14B (original Wan, diffusers/PEFT or musubi key
    names); ``strength``: its multiplier (W + strength * alpha / rank * B @ A; 0 merges nothing,
    negative ones subtract)."""

    path: str
    strength: float = 1.0

    def __post_init__(self):
        if not self.path:
            raise BindWeaveInputError("model.loras: an entry has no path: write model.loras=[{path: "
                                      "weights/my_lora.safetensors, strength: 1.0}]")
        if not math.isfinite(self.strength):
            raise BindWeaveInputError(f"model.loras: strength={self.strength} of {self.path} must be a finite "
                                      "number (1.0: as trained)")
