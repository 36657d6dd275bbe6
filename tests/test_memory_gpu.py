"""Block offload on a CUDA GPU (bindweave/model/offload.py): the streamed DiT gives bit-identical
latents to the resident one, and between uses every block's weights are back on the host, pinned.
Skipped without a CUDA GPU (CI)."""

import json

import pytest
import torch

from bindweave.model.offload import offloaded_blocks
from bindweave.model.speed import apply_speed_options
from bindweave.settings.model import ModelSettings, SpeedOptions, VideoSettings
from bindweave.model.transformer import TINY_CONFIG, BindWeaveTransformer
from bindweave.sampling.sampler import denoise, initial_noise, make_scheduler
from bindweave.settings.sampling import SamplerSettings
from bindweave.stages.coordinator import SingleProcess
from bindweave.stages.phases import dit_predictor, prepare_inputs
from support.engines import build_models
from dataclasses import replace
from bindweave.io.inputs import read_meta
from bindweave.testing.demo import demo_meta_with_hidden_states
from parallel_launch import run_script
from support.dit_inputs import tiny_dit_inputs as tiny_inputs

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
    resident = build_models(settings)
    offloaded = build_models(replace(settings, memory="offload"))
    meta = demo_meta_with_hidden_states(tmp_path / "demo", hidden_dim=resident.hidden_dim,
                                        qwen_folder=tiny_models.qwen)
    sample = read_meta(meta)[0]
    expected = latents_of(resident, sample)
    got = latents_of(offloaded, sample)
    assert torch.equal(got, expected)
    torch.cuda.synchronize()
    buffer = offloaded.transformer.blocks[0].ffn.net[0].proj.weight.untyped_storage().data_ptr()
    for index, block in enumerate(offloaded.transformer.blocks):
        for name, parameter in block.named_parameters():
            assert parameter.device.type == "cpu", (index, name)
            assert parameter.is_pinned(), (index, name)  # streamed copies need page-locked memory
            # Still the loader's one page-locked buffer: the hooks made no second host copy.
            assert parameter.untyped_storage().data_ptr() == buffer, (index, name)


@torch.no_grad()
def test_offload_with_compiled_blocks_gives_the_resident_output():
    """Compile applied around the offload hooks (bindweave.model.speed's order): a 2-block DiT with
    the real head size, streamed, against the same options resident. (FP8 weights with offload are
    refused: on the H200, 2026-12-01, their output matched but the blocks' FP8 weights were not back
    on the host between uses.)"""
    options = SpeedOptions("cudnn", fuse_projections=True, compile=True)
    config = dict(TINY_CONFIG, num_attention_heads=2, attention_head_dim=128, added_kv_proj_dim=256, ffn_dim=512)
    torch.manual_seed(0)
    built = BindWeaveTransformer(**config).to(torch.bfloat16).eval()
    host_copy = BindWeaveTransformer(**config).to(torch.bfloat16).eval()
    host_copy.load_state_dict(built.state_dict())
    resident = apply_speed_options(built.cuda(), options)
    streamed = apply_speed_options(host_copy, options, offload_to=torch.device("cuda"))
    x = {key: value.to("cuda", torch.bfloat16) if value.is_floating_point() else value.cuda()
         for key, value in tiny_inputs(frames=5, height=16, width=16).items()}
    x["timestep"] = x["timestep"].float()
    expected = resident(**x)
    got = streamed(**x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert offloaded_blocks(streamed) == list(range(config["num_layers"]))
    for index, block in enumerate(streamed.blocks):
        assert all(tensor.device.type == "cpu" and tensor.is_pinned() for tensor in block.parameters()), index


def test_two_processes_stream_from_one_shared_host_buffer(tmp_path):
    """Two ranks on one GPU (our GPU host has one): rank 0 reads the files into the buffer, rank 1
    maps it; each page-locks its mapping and streams bit-identical latents (tests/gpu_shared_offload.py)."""
    run_script("tests/gpu_shared_offload.py", tmp_path / "tiny", tmp_path, processes=2, timeout=300)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        assert report["identical_latents"] and report["registered"], report
        assert report["all_pinned"] and report["all_in_buffer"], report
    assert reports[0]["read_by"] == reports[0]["pid"] == reports[1]["read_by"] != reports[1]["pid"]
