"""Memory modes (bindweave/stages/memory.py, bindweave/model/offload.py): ``model.memory=auto``
picks as documented from the free GPU memory and the job's size; offload installs diffusers' group
offloading on every block and computes what the resident model computes; what cannot combine is
refused before loading. The GPU checks (streamed blocks, weights on the host between uses) are in
tests/test_memory_gpu.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bindweave.errors import BindWeaveInputError
from bindweave.model.offload import offloaded_blocks
from bindweave.app.build import BuildRequest, job_size, plan_build, plan_memory_for, probe_device
from support.engines import build_models, simulate_gpu
from bindweave.settings.model import ModelSettings, VideoSettings
from bindweave.model.transformer import BINDWEAVE_14B_CONFIG, TINY_CONFIG
from bindweave.stages.memory import (JobSize, cap_gpu_memory, MemoryPlan, available_host_gib, check_host_memory, host_need,
                                     plan_memory)
from bindweave.settings.parallel import ParallelSettings
from support.dit_inputs import tiny_dit_inputs as tiny_inputs

P720_VIDEO = VideoSettings(height=720, width=1280, num_frames=81)
P720 = JobSize(video_tokens=90_000)  # 720P x 81 frames
P480 = JobSize(video_tokens=39_000)  # 832 x 480 x 81 frames


@pytest.mark.parametrize("free, size, mode, offload_encoders", [
    (139.0, P720, "resident", False),                     # H200: everything on the GPU
    (79.0, P720, "resident", False),                      # H100 80 GB
    (49.0, P720, "resident", True),                       # the DiT stays, T5 + CLIP move (48.6 GiB with them in)
    (48.0, P720, "offload", True),                        # L40S / A6000: conditioning would not fit beside the DiT
    (40.0, JobSize(90_000, fp8=True), "resident", True),   # FP8 weights on a 48 GB card: resident, encoders move
    (46.0, JobSize(90_000, fp8=True), "resident", False),  # FP8 weights: all of it fits in 46 GiB
    (32.0, P720, "offload", True),                        # RTX 5090
    (24.0, P720, "offload", True),                        # RTX 4090 / 3090
    (24.0, P480, "offload", True),
    (None, P720, "resident", False),                      # no GPU: the host holds everything
])
def test_auto_picks_the_first_plan_that_fits(free, size, mode, offload_encoders):
    plan = plan_memory("auto", free, size)
    assert (plan.mode, plan.offload_encoders) == (mode, offload_encoders), plan
    if free is not None:
        assert plan.need_gib <= free and f"{free:.1f} GiB" in plan.reason
    assert plan.vae_tiling == (mode == "offload")


def test_a_job_that_does_not_fit_even_offloaded_is_refused_with_what_it_needs():
    with pytest.raises(MemoryError, match=r"needs ~16\.7 GiB on the GPU even with the DiT's blocks offloaded and "
                                          r"12\.0 GiB are free \(90,000 video tokens"):
        plan_memory("auto", 12.0, P720)


def test_explicit_modes_and_the_users_own_options_stay():
    assert plan_memory("resident", 24.0, P720).mode == "resident"  # asked for: not second-guessed
    offload = plan_memory("offload", 139.0, P720)
    assert (offload.mode, offload.offload_encoders, offload.vae_tiling) == ("offload", True, True)
    kept = plan_memory("auto", 139.0, P720, offload_encoders=True, vae_tiling=True)
    assert (kept.mode, kept.offload_encoders, kept.vae_tiling) == ("resident", True, True)


def memory_plan_for(settings: ModelSettings, size: JobSize, device: torch.device, processes_on_host: int = 1):
    """The build plan's memory step for ``device`` as probed (the GPU faked by FakeGpu)."""
    return plan_memory_for(settings, size, probe_device(device, settings.gpu_memory_gib), processes_on_host)


def test_the_job_size_is_the_ranks_share_of_the_real_token_count():
    assert job_size(BINDWEAVE_14B_CONFIG, VideoSettings()).video_tokens == 90_000
    assert job_size(BINDWEAVE_14B_CONFIG, VideoSettings(), sequence_ranks=4).video_tokens == 22_500
    assert job_size(BINDWEAVE_14B_CONFIG, VideoSettings(), fp8=True).fp8
    assert memory_plan_for(ModelSettings(dit="d", wan="w"), P720, torch.device("cpu")).mode == "resident"


def test_offloaded_dit_has_every_block_hooked_and_computes_the_same(tiny_models, tmp_path):
    settings = ModelSettings(tiny_root=str(tiny_models.bindweave.parent), dtype="float32", device="cpu",
                             cache_dir=str(tmp_path), memory="offload")
    offloaded = build_models(settings)
    resident = build_models(replace(settings, memory="resident"))
    assert offloaded_blocks(offloaded.transformer) == list(range(TINY_CONFIG["num_layers"]))
    assert offloaded_blocks(resident.transformer) == []
    # Applied after the attention hook: every block's self-attention still runs the chosen kernel's hook.
    assert all(block.attn1.processor.hook is offloaded.transformer.attention_hook
               for block in offloaded.transformer.blocks)
    assert offloaded.offload_encoders and offloaded.vae.model.use_tiling
    assert offloaded.plan.memory.mode == "offload" and offloaded.plan.dit_loader == "host_buffer"
    x = tiny_inputs()
    with torch.no_grad():
        # Not bit-equal on a CPU: the strict loader's float32 weights stay in the file's mapping at
        # any alignment, the offload loader's sit aligned in one buffer, and CPU GEMMs round
        # differently for the two (on a GPU both are copied over: bit-identical, tests/test_memory_gpu.py).
        torch.testing.assert_close(offloaded.transformer(**x), resident.transformer(**x), rtol=1e-5, atol=1e-6)


def test_offload_with_fsdp_is_refused_before_loading(tiny_models):
    from parallel.distributed import Processes

    settings = ModelSettings(tiny_root=str(tiny_models.bindweave.parent), dtype="float32", memory="offload")
    two = Processes(rank=0, world_size=2, local_world_size=2)
    with pytest.raises(BindWeaveInputError, match=r"model.memory=offload cannot apply with parallel.fsdp=\['dit'\]"):
        plan_build(BuildRequest(settings, P720_VIDEO, ParallelSettings(cfg=2, fsdp=("dit",))), two)
    # sequence parallel + offload: each rank streams its share (one host buffer per machine)
    plan = plan_build(BuildRequest(settings, P720_VIDEO, ParallelSettings(ulysses=2)), two)
    assert plan.dit_loader == "host_buffer" and plan.share_host_buffer


def test_a_bad_memory_mode_names_the_choices():
    with pytest.raises(BindWeaveInputError, match="model.memory=small is not one of auto, resident, offload"):
        ModelSettings(memory="small")
    assert isinstance(plan_memory("auto", 100.0, P720), MemoryPlan)


class FakeGpu:
    """torch.cuda's memory queries for a 139 GiB GPU with 137 GiB free, recording the allocator cap,
    on a host with ``host_gib`` available."""

    def __init__(self, monkeypatch, reserved_gib=0.5, host_gib=120.0):
        self.fraction = None
        gib = 2**30
        monkeypatch.setattr("bindweave.app.build.available_host_gib", lambda: host_gib)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (137 * gib, 139 * gib))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved_gib * gib)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake H200")
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                            lambda fraction, device: setattr(self, "fraction", fraction))


@pytest.mark.parametrize("cap, mode, offload_encoders", [(None, "resident", False), (50, "resident", True),
                                                         (48, "offload", True), (24, "offload", True)])
def test_a_gpu_memory_cap_bounds_the_allocator_and_the_plan(monkeypatch, cap, mode, offload_encoders):
    gpu = FakeGpu(monkeypatch)
    settings = ModelSettings(dit="d", wan="w", gpu_memory_gib=cap)
    plan = memory_plan_for(settings, P720, torch.device("cuda", 0))
    assert (plan.mode, plan.offload_encoders) == (mode, offload_encoders), plan
    assert gpu.fraction is None  # planning changes nothing; build_engine caps the allocator first
    cap_gpu_memory(torch.device("cuda", 0), cap)
    assert gpu.fraction == (cap / 139 if cap else None)
    # What the process already holds counts against its cap.
    assert f"{(cap - 0.5) if cap else 137:.1f} GiB" in plan.reason


def test_a_cap_beyond_the_gpu_or_too_small_for_the_job_is_refused_before_loading(monkeypatch):
    FakeGpu(monkeypatch)
    with pytest.raises(BindWeaveInputError, match=r"model.gpu_memory_gib=200 GiB: the GPU \(Fake H200\) has 139.0 GiB"):
        memory_plan_for(ModelSettings(dit="d", wan="w", gpu_memory_gib=200), P720, torch.device("cuda", 0))
    with pytest.raises(BindWeaveInputError, match=r"model.memory=auto \(model.gpu_memory_gib=12\): this job needs"):
        memory_plan_for(ModelSettings(dit="d", wan="w", gpu_memory_gib=12), P720, torch.device("cuda", 0))
    with pytest.raises(BindWeaveInputError, match="model.gpu_memory_gib=0 must be > 0 GiB"):
        ModelSettings(dit="d", wan="w", gpu_memory_gib=0)


def test_resident_asked_for_beyond_the_cap_says_so(monkeypatch):
    FakeGpu(monkeypatch)
    plan = memory_plan_for(ModelSettings(dit="d", wan="w", memory="resident", gpu_memory_gib=24), P720,
                           torch.device("cuda", 0))
    assert plan.mode == "resident" and "model.memory=auto would offload" in plan.reason


def test_qwen_that_cannot_fit_the_cap_is_refused_before_its_weights_are_read(monkeypatch, tmp_path):
    from bindweave.encoders.qwen import refuse_what_cannot_fit

    FakeGpu(monkeypatch)
    with open(tmp_path / "model-00001.safetensors", "wb") as weights:
        weights.truncate(16 * 2**30)  # sparse: the size is all that is read
    refuse_what_cannot_fit(tmp_path, torch.device("cuda", 0), torch.bfloat16, 24)  # 16 + 2 of 23.5 GiB
    with pytest.raises(BindWeaveInputError, match=r"needs ~18.0 GiB .* 15.5 GiB are free within qwen.gpu_memory_gib=16"):
        refuse_what_cannot_fit(tmp_path, torch.device("cuda", 0), torch.bfloat16, 16)


def test_fp8_with_offloaded_blocks_is_refused_and_auto_fp8_keeps_the_dtype(monkeypatch, tiny_models):
    simulate_gpu(monkeypatch, free_gib=20.0)  # an FP8 GPU where a 720P x 161 job must offload
    settings = ModelSettings(tiny_root=str(tiny_models.bindweave.parent), dtype="bfloat16", linear_precision="fp8")
    long_video = VideoSettings(height=720, width=1280, num_frames=161)
    with pytest.raises(BindWeaveInputError, match="model.linear_precision=fp8 cannot apply with offloaded blocks"):
        plan_build(BuildRequest(settings, long_video))
    plan = plan_build(BuildRequest(replace(settings, linear_precision="auto_fp8"), long_video))
    assert plan.memory.mode == "offload" and plan.speed.linear_precision == "dtype"
    assert "linear_precision=auto_fp8: linears stay in bfloat16, as the DiT's blocks are offloaded" in plan.notes
    # Where the DiT stays resident, auto_fp8 is FP8.
    assert plan_build(BuildRequest(replace(settings, linear_precision="auto_fp8"), P720_VIDEO)).fp8


def test_the_offload_loader_fills_one_host_buffer_with_the_checkpoints_weights(tiny_models):
    """Offload loads the DiT into one host buffer (page-locked on CUDA machines): every weight a view
    of it, equal to the strict loader's; with fused projections the fused q/k/v / K/V are filled
    from the separate tensors and compute what fusing after loading computes."""
    from bindweave.model.loading import load_bindweave_to_host_buffer, load_bindweave_transformer
    from bindweave.model.speed import fuse_projections

    expected = load_bindweave_transformer(tiny_models.bindweave, dtype=torch.bfloat16)
    loaded = load_bindweave_to_host_buffer(tiny_models.bindweave, torch.bfloat16)
    assert {parameter.untyped_storage().data_ptr() for parameter in loaded.parameters()} == \
        {loaded.scale_shift_table.untyped_storage().data_ptr()}
    for (name, tensor), (expected_name, expected_tensor) in zip(loaded.state_dict().items(),
                                                                 expected.state_dict().items()):
        assert name == expected_name and tensor.dtype == expected_tensor.dtype and torch.equal(tensor, expected_tensor)

    reference = load_bindweave_transformer(tiny_models.bindweave, dtype=torch.float32)
    fuse_projections(reference)
    fused = load_bindweave_to_host_buffer(tiny_models.bindweave, torch.float32, fuse=True)
    assert not hasattr(fused.blocks[0].attn1, "to_q")  # held once, in the fused layer only
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fused(**x), reference(**x), rtol=1e-5, atol=1e-5)


def test_host_memory_of_an_offloaded_720p_job_is_the_measured_peak():
    """48.6 GiB peak RSS measured offloaded (NVIDIA H200 machine, 2026-12-02): the DiT's 31.9 GiB
    in a 32 GiB page-locked buffer, T5 + CLIP, the process. More processes on the machine share
    one DiT buffer (not rounded up); each holds its own encoders."""
    offload = plan_memory("auto", 24.0, P720)
    assert host_need(offload, P720) == pytest.approx(48.6, abs=0.05)
    assert host_need(offload, P720, processes_on_host=2) == pytest.approx(31.9 + 2 * 16.6, abs=0.05)
    assert host_need(plan_memory("auto", 139.0, P720), P720) < 5


@pytest.mark.parametrize("available, processes, refused", [
    (64.0, 1, False),   # a 64 GB workstation with one 24 GB card
    (40.0, 1, True),
    (80.0, 2, False),   # 2 x 24 GB with ulysses2: one DiT for both, T5 + CLIP each (65.1 GiB)
    (60.0, 2, True),
    (None, 8, False),   # not Linux: nothing known to check against
])
def test_an_offloaded_job_the_host_cannot_hold_is_refused_before_loading(available, processes, refused):
    offload = plan_memory("auto", 24.0, P720)
    if not refused:
        check_host_memory(offload, P720, processes, available)
        return
    with pytest.raises(MemoryError, match=rf"~{host_need(offload, P720, processes):.1f} GiB on this machine \(the "
                                          rf"DiT's blocks {32.0 if processes == 1 else 31.9} GiB, once per machine \+ {processes} x 16\.6 GiB per "
                                          r"process .*available \(MemAvailable\).*fewer processes"):
        check_host_memory(offload, P720, processes, available)


def test_a_resident_job_is_never_refused_for_host_memory():
    check_host_memory(plan_memory("auto", 139.0, P720), P720, 8, 1.0)


def test_available_host_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65536000 kB\nMemFree:         1000000 kB\nMemAvailable:   41943040 kB\n")
    assert available_host_gib(meminfo) == 40.0
    assert available_host_gib(tmp_path / "absent") is None


def test_the_host_memory_check_runs_with_the_gpu_plan_for_the_processes_on_the_machine(monkeypatch):
    settings = ModelSettings(dit="d", wan="w", gpu_memory_gib=24)
    FakeGpu(monkeypatch, host_gib=64.0)
    assert memory_plan_for(settings, P720, torch.device("cuda", 0)).mode == "offload"
    with pytest.raises(BindWeaveInputError, match=r"model.memory=auto \(model.gpu_memory_gib=24\): .* 2 x 16.6 GiB per process"):
        memory_plan_for(settings, P720, torch.device("cuda", 0), processes_on_host=2)
