"""How a stage-3 job holds its models on one GPU: ``model.memory=auto|resident|offload``.

- ``resident``: everything stays on the GPU (the fastest; ~55 GiB at 720P x 81 in bf16).
- ``offload``: the DiT's blocks live on the host in pinned memory and are streamed in one block
  ahead of use on a side stream (diffusers' group offloading, block level), T5 and CLIP come to the
  GPU only while a sample is conditioned, and the VAE decodes in tiles. The GPU holds ~2 blocks, the
  small modules and the activations.
- ``auto``: from the free GPU memory and the job's size, the first of these that fits (logged
  with the numbers): resident; resident DiT with the encoders offloaded; offload. A job that does
  not fit even offloaded is refused before loading, with what it needs.

The sizes are measured, not guessed (NVIDIA H200, 2026-12-01, docs/PERFORMANCE.md): the 14B DiT is
31.7 GiB in bf16 and ~20.3 GiB with FP8 linears (0.79 / 0.50 GiB per block), UMT5-XXL + CLIP ViT-H
11.8 GiB, the VAE 0.25 GiB, and denoising needs ~0.10 GiB per thousand video tokens (9 GiB at
90,000 tokens); an untiled 720P x 81 decode adds ~2.2 GiB over that, a tiled one a few hundred MiB;
conditioning needs ~3.1 GiB beside the models. Against the 720P x 81 jobs measured through the
README command (H200, 2026-12-01, without the 1.5 GiB margin): resident 55.2 estimated / 54.9
measured; DiT resident with T5 + CLIP offloaded 47.1 / 47.05 (conditioning); offloaded 11.1 / 11.0
while denoising, 15.2 / 14.3 while conditioning.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from bindweave.settings.model import MEMORY_MODES

GIB = 2**30

BLOCK_GIB = {"dtype": 0.79, "fp8": 0.50}  # one of the 40 blocks, bf16 / FP8 linears
DIT_OTHER_GIB = 0.3  # embedders, patch embedding, head
ENCODERS_GIB = 11.8  # UMT5-XXL encoder + CLIP ViT-H, bf16
VAE_GIB = 0.25
ACTIVATION_GIB_PER_1K_TOKENS = 0.10  # denoising, both CFG sides in turn
UNTILED_DECODE_GIB_PER_1K_TOKENS = 0.025  # the decode's extra over denoising (2.2 GiB at 90,000 tokens)
# Conditioning's own working memory beside the models (VAE encode of the condition video, CLIP):
# 3.1 GiB at 90,000 tokens (NVIDIA H200, 2026-12-01: 47.05 GiB peak with the DiT resident and T5 +
# CLIP brought in, model.gpu_memory_gib=48).
CONDITIONING_GIB_PER_1K_TOKENS = 0.035
MARGIN_GIB = 1.5  # allocator fragmentation, CUDA context
PREFETCHED_BLOCKS = 2  # offload: the block in use and the one streaming in
# A stage-3 process's host memory beside the weights it holds there (Python, PyTorch, the CUDA
# context, buffers): offloaded, 48.6 GiB peak RSS = 32 GiB page-locked DiT (PyTorch's pinned
# allocator rounded 31.9 up then) + 11.8 GiB T5 and CLIP + 4.8 (NVIDIA H200 machine, 2026-12-02,
# docs/PERFORMANCE.md).
HOST_PROCESS_GIB = 4.8


@dataclass(frozen=True)
class JobSize:
    """What decides a stage-3 job's memory: its video tokens, the DiT's depth and precision."""

    video_tokens: int
    num_layers: int = 40
    fp8: bool = False

    @property
    def dit_gib(self) -> float:
        return self.num_layers * BLOCK_GIB["fp8" if self.fp8 else "dtype"] + DIT_OTHER_GIB

    @property
    def activations_gib(self) -> float:
        return self.video_tokens / 1000 * ACTIVATION_GIB_PER_1K_TOKENS

    @property
    def conditioning_gib(self) -> float:
        return self.video_tokens / 1000 * CONDITIONING_GIB_PER_1K_TOKENS

    @property
    def untiled_decode_gib(self) -> float:
        return self.video_tokens / 1000 * UNTILED_DECODE_GIB_PER_1K_TOKENS


@dataclass(frozen=True)
class MemoryPlan:
    """What a job does with its models, and the numbers that chose it (logged, in sidecars)."""

    mode: str  # resident | offload (what runs)
    offload_encoders: bool
    vae_tiling: bool
    need_gib: float  # the estimated peak on the GPU with this plan
    reason: str

    def record(self) -> dict:
        return {"mode": self.mode, "offload_encoders": self.offload_encoders, "vae_tiling": self.vae_tiling,
                "estimated_peak_gib": round(self.need_gib, 1), "reason": self.reason}


def resident_need(job: JobSize, offload_encoders: bool, vae_tiling: bool) -> float:
    """The larger of the two peaks with the DiT resident: conditioning (T5 and CLIP on the GPU beside
    it, offloaded or not) and denoising + decode (offloaded encoders are back on the host)."""
    decode = 0.0 if vae_tiling else job.untiled_decode_gib
    encoders = 0.0 if offload_encoders else ENCODERS_GIB
    conditioning = job.dit_gib + ENCODERS_GIB + VAE_GIB + job.conditioning_gib
    denoising = job.dit_gib + encoders + VAE_GIB + job.activations_gib + decode
    return max(conditioning, denoising) + MARGIN_GIB


def offload_need(job: JobSize) -> float:
    """Offloaded: two blocks, the small modules, the VAE (tiled) and the activations. The encoders
    visit the GPU alone, while no block is there: their 11.8 GiB count only if they are the peak."""
    streamed = PREFETCHED_BLOCKS * BLOCK_GIB["fp8" if job.fp8 else "dtype"] + DIT_OTHER_GIB
    return max(streamed + VAE_GIB + job.activations_gib, ENCODERS_GIB + VAE_GIB + job.conditioning_gib) + MARGIN_GIB


def plan_memory(mode: str, free_gib: float | None, job: JobSize, offload_encoders: bool = False,
                vae_tiling: bool = False) -> MemoryPlan:
    """The plan for ``mode`` (``auto`` chooses; ``free_gib`` None: no GPU, everything resident).
    ``offload_encoders`` / ``vae_tiling`` asked for by the user stay on in every plan."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode {mode!r}: choose one of {', '.join(MEMORY_MODES)}")
    if mode == "resident" or (mode == "auto" and free_gib is None):
        need = resident_need(job, offload_encoders, vae_tiling)
        why = "asked for" if mode == "resident" else "no GPU: the host holds everything"
        if free_gib is not None and need > free_gib:
            why += f", though it needs ~{need:.1f} GiB and {free_gib:.1f} GiB are free (model.memory=auto would offload)"
        return MemoryPlan("resident", offload_encoders, vae_tiling, need, why)
    if mode == "offload":
        return MemoryPlan("offload", True, True, offload_need(job), "asked for")
    for encoders_off in sorted({offload_encoders, True}):
        need = resident_need(job, encoders_off, vae_tiling)
        if need <= free_gib:
            how = "everything on the GPU" if not encoders_off else "the DiT on the GPU, T5 and CLIP offloaded"
            return MemoryPlan("resident", encoders_off, vae_tiling, need,
                              f"{how}: needs ~{need:.1f} GiB of {free_gib:.1f} GiB free")
    need = offload_need(job)
    if need > free_gib:
        raise MemoryError(
            f"this job needs ~{need:.1f} GiB on the GPU even with the DiT's blocks offloaded and "
            f"{free_gib:.1f} GiB are free ({job.video_tokens:,} video tokens: activations "
            f"~{job.activations_gib:.1f} GiB); lower video.height/width/num_frames, use model.linear_precision=fp8, "
            f"or split the tokens over GPUs (parallel=ulysses2)")
    return MemoryPlan("offload", True, True, need,
                      f"resident needs ~{resident_need(job, True, vae_tiling):.1f} GiB (DiT {job.dit_gib:.1f} GiB + "
                      f"activations {job.activations_gib:.1f} GiB) but {free_gib:.1f} GiB are free: the DiT's "
                      f"blocks stream from pinned host memory (~{need:.1f} GiB on the GPU)")


def host_dit_gib(plan: MemoryPlan, job: JobSize, processes_on_host: int = 1) -> float:
    """The host memory (GiB) an offloaded DiT takes on one machine: once, in one page-locked buffer
    (one process: PyTorch's pinned allocator rounds it up to a power of two, 31.9 -> 32 GiB;
    several: a shared one they all map, bindweave.model.host_buffer)."""
    if plan.mode != "offload":
        return 0.0
    return 2 ** math.ceil(math.log2(job.dit_gib)) if processes_on_host == 1 else job.dit_gib


def host_process_gib(plan: MemoryPlan) -> float:
    """One process's own host memory (GiB): offloaded encoders wait there between samples, beside
    the process itself."""
    return (ENCODERS_GIB if plan.offload_encoders else 0.0) + HOST_PROCESS_GIB


def host_need(plan: MemoryPlan, job: JobSize, processes_on_host: int = 1) -> float:
    """The peak host memory (GiB) of the launch's ``processes_on_host`` processes on one machine."""
    return host_dit_gib(plan, job, processes_on_host) + processes_on_host * host_process_gib(plan)


def check_host_memory(plan: MemoryPlan, job: JobSize, processes_on_host: int, available_gib: float | None) -> None:
    """Refuse, before loading, a plan whose weights held on the host do not fit in the host's
    available memory (shared by the launch's ``processes_on_host`` processes): better than the
    kernel's out-of-memory killer part-way through loading 32 GiB. Nothing to check where nothing is
    offloaded, or where the available memory is unknown (``None``: not Linux)."""
    if available_gib is None or not (plan.mode == "offload" or plan.offload_encoders):
        return
    need = host_need(plan, job, processes_on_host)
    if need > available_gib:
        parts = [f"the DiT's blocks {host_dit_gib(plan, job, processes_on_host):.1f} GiB, once per machine"] \
            if plan.mode == "offload" else []
        parts.append(f"{processes_on_host} x {host_process_gib(plan):.1f} GiB per process (T5 + CLIP, PyTorch)")
        raise MemoryError(
            f"offloaded weights wait in host memory: ~{need:.1f} GiB on this machine ({' + '.join(parts)}), but "
            f"{available_gib:.1f} GiB are available (MemAvailable); free host memory, start fewer processes per "
            f"machine, or use GPUs with room for the DiT (~{resident_need(job, True, True):.1f} GiB keeps it resident)")


def available_host_gib(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """The host memory the kernel can give without swapping (MemAvailable), in GiB; None off Linux."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def gpu_memory_within(device, limit_gib: float | None, setting: str) -> float | None:
    """The GiB this process may take on ``device``: the free memory, within ``limit_gib`` (``setting``
    names the option in errors; a ValueError if the GPU is smaller). None on a CPU (no cap applies).
    A cap is how a job runs as on a smaller card, or beside another process on the same GPU;
    :func:`cap_gpu_memory` applies it."""
    if device.type != "cuda":
        return None
    free, total = (value / GIB for value in torch.cuda.mem_get_info(device))
    if limit_gib is None:
        return free
    if not 0 < limit_gib <= total:
        raise ValueError(f"{setting}={limit_gib} GiB: the GPU ({torch.cuda.get_device_name(device)}) has "
                         f"{total:.1f} GiB; give a value in (0, {total:.1f}] or null for all of it")
    return min(free, limit_gib - torch.cuda.memory_reserved(device) / GIB)


def cap_gpu_memory(device, limit_gib: float | None) -> None:
    """Cap PyTorch's allocator on ``device`` at ``limit_gib`` (checked by :func:`gpu_memory_within`)."""
    if device.type == "cuda" and limit_gib is not None:
        total = torch.cuda.mem_get_info(device)[1] / GIB
        torch.cuda.set_per_process_memory_fraction(limit_gib / total, device)


def memory_snapshot(device) -> dict:
    """Peak GPU memory since the last snapshot (then reset: allocated by tensors, and reserved by
    PyTorch's caching allocator, what a card must have) and this process's peak host RSS, in GiB."""
    report = {"host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)}
    if device.type == "cuda":
        report["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
        report["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 3)
        torch.cuda.reset_peak_memory_stats(device)
    return report


def peak_of(memory: dict) -> float:
    """The headline peak: GPU memory on CUDA, host RSS on the CPU."""
    key = "gpu_peak_gib" if any("gpu_peak_gib" in stage for stage in memory.values()) else "host_peak_rss_gib"
    return max(stage[key] for stage in memory.values())
