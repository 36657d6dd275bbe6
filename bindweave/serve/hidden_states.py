"""Stage 2 for one request, in memory: the prompt and its references -> Qwen2.5-VL hidden states.

The same steps and functions as stage 2's ``extract_sample`` (bindweave/stages/extract.py): the
references pre-scaled once, one prefill pass with the prompt and one with the Qwen negative prompt,
each state cast to the dtype stage 2 saves (bf16). So a job here conditions on exactly what a
meta-JSON run would read back from stage 2's file, and makes the same video.

    encode = PromptEncoder(load_qwen(settings))      # loaded once, at start-up
    positive, negative = encode(prompt, images)      # [1, L, hidden] each, on the CPU
"""

from __future__ import annotations

import torch
from PIL import Image

from bindweave.encoders.prompts import QWEN_NEGATIVE_PROMPT
from bindweave.encoders.qwen import QwenVL, build_inputs, prefill_hidden_states, prescale_references
from bindweave.stages.extract import SAVED_DTYPE


class PromptEncoder:
    def __init__(self, qwen: QwenVL):
        self.qwen = qwen

    @property
    def hidden_size(self) -> int:
        return self.qwen.hidden_size

    def __call__(self, prompt: str, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = prescale_references(images)
        positive, negative = (prefill_hidden_states(self.qwen.model, build_inputs(self.qwen, text, scaled))
                              .to(SAVED_DTYPE).cpu() for text in (prompt, QWEN_NEGATIVE_PROMPT))
        return positive, negative
