"""Seeded inputs of one tiny-DiT forward (bindweave.model.transformer.TINY_CONFIG), shared by the
tests that compare forwards: the same numbers wherever they are asked for."""

import torch

from bindweave.model.transformer import TINY_CONFIG


def tiny_dit_inputs(frames=3, height=8, width=12, qwen_tokens=7, clip_tokens=1028, seed=1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    c = TINY_CONFIG
    return dict(
        latents=torch.randn(1, 16, frames, height, width, generator=generator),
        timestep=torch.tensor([937.0]),
        t5_embeds=torch.randn(1, 512, c["text_dim"], generator=generator),
        qwen_states=torch.randn(1, qwen_tokens, c["mllm_dim"], generator=generator),
        clip_embeds=torch.randn(1, clip_tokens, c["image_dim"], generator=generator),
        condition=torch.randn(1, 20, c["max_references"] + frames, height, width, generator=generator),
    )
