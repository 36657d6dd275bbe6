"""Block offload on a CUDA GPU (bindweave/model/offload.py): the streamed DiT gives bit-identical
latents to the resident one, and between uses every block's weights are back on the host, pinned.
Skipped without a CUDA GPU (CI)."""

import pytest
import torch

from bindweave.sampling.sampler import SamplerSettings, denoise, initial_noise, make_scheduler
from bindweave.stages.coordinator import SingleProcess
from bindweave.stages.generate import ModelSettings, VideoSettings, dit_predictor, load_stage3_models, prepare_inputs
from bindweave.stages.memory import JobSize, plan_memory
from bindweave.io.inputs import read_meta
from bindweave.testing.demo import demo_meta_with_hidden_states

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
VIDEO = VideoSettings(height=48, width=64, num_frames=5)


def latents_of(models, sample) -> torch.Tensor:
    inputs = prepare_inputs(models, sample, VIDEO)
    sampler = SamplerSettings(num_steps=3)
    velocity = SingleProcess().guided_velocity(dit_predictor(models.transformer, inputs), sampler.guidance_scale)
    return denoise(initial_noise(VIDEO.latent_shape, 3).cuda(), make_scheduler(sampler), velocity)


@torch.no_grad()
def test_offloaded_blocks_give_the_resident_latents_and_rest_on_the_host(tiny_models, tmp_path):
    settings = ModelSettings(tiny_root=str(tiny_models.bindweave.parent), dtype="bfloat16", device="cuda",
                             cache_dir=str(tmp_path))
    resident = load_stage3_models(settings)
    offloaded = load_stage3_models(settings, memory_plan=plan_memory("offload", 1.0, JobSize(video_tokens=100)))
    meta = demo_meta_with_hidden_states(tmp_path / "demo", hidden_dim=resident.hidden_dim,
                                        qwen_folder=tiny_models.qwen)
    sample = read_meta(meta)[0]
    expected = latents_of(resident, sample)
    got = latents_of(offloaded, sample)
    assert torch.equal(got, expected)
    torch.cuda.synchronize()
    for index, block in enumerate(offloaded.transformer.blocks):
        for name, parameter in block.named_parameters():
            assert parameter.device.type == "cpu", (index, name)
            assert parameter.is_pinned(), (index, name)  # streamed copies need page-locked memory
