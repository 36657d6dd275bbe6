"""Stage 2 for one request, in memory: the prompt and its references -> Qwen2.5-VL hidden states.

Stage 2's own function (``prompt_hidden_states`` in bindweave/stages/extract.py): the references
pre-scaled once, one prefill pass with the prompt and one with the Qwen negative prompt, each state
cast to the dtype stage 2 saves (bf16). So a job here conditions on exactly what a
meta-JSON run would read back from stage 2's file, and makes the same video.

    encode = PromptEncoder(load_qwen(settings))      # loaded once, at start-up
    positive, negative = encode(prompt, images)      # [1, L, hidden] each, on the CPU
"""

from __future__ import annotations

import torch
from PIL import Image

from bindweave.encoders.qwen import QwenVL
from bindweave.stages.extract import prompt_hidden_states


class PromptEncoder:
    def __init__(self, qwen: QwenVL):
        self.qwen = qwen

    @property
    def hidden_size(self) -> int:
        return self.qwen.hidden_size

    def __call__(self, prompt: str, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        positive, negative, _ = prompt_hidden_states(self.qwen, prompt, images)
        return positive, negative
