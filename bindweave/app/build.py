"""The one door into the stage-3 engine: :func:`plan_build` settles every choice, :func:`build_engine`
carries the plan out. ``launch/generate.py``, a Hydra multirun, ``launch/calibrate.py``,
``launch/serve.py``, the benchmarks and the Python API (bindweave/app/api.py) all build this way.

``plan_build`` decides, once and before a weight is read: the weights' folders and the DiT's
config, the device, the process layout, the self-attention kernel (bindweave/model/kernels.py)
and what runs at each call site under that layout, FP8 linears, fused projections and compile,
the memory plan (resident or offloaded DiT, encoders offloaded, tiled decode), which loader fills
the DiT (resident, host buffer, FSDP shards) and whether the launch's processes on one machine
share its host buffer. Every refusal (a combination that cannot run) and every fallback (an
``auto`` choice passing over what cannot run, noted in ``plan.notes``) is decided here, nowhere else.

``build_engine`` applies the plan in one order: cap the allocator; load (the DiT by the planned
loader, FSDP shards filled per rank; T5 and CLIP where the memory plan puts them; T5 sharded);
convert (fused projections, FP8); offload hooks; the attention kernel, wrapped in the sequence
sharding of the layout; compile (bindweave.model.speed.apply_speed_options runs the last four).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from bindweave.errors import BindWeaveInputError
from bindweave.io.checkpoint import read_config
from bindweave.model.flops import video_tokens
from bindweave.model.kernels import CROSS_ATTENTION, KERNELS, DeviceFacts, sequence_local_kernel
from bindweave.model.loading import parameter_shapes
from bindweave.model.lora import LoraMerge
from bindweave.model.speed import probe_kernel_facts, resolve_speed_options
from bindweave.model.transformer import BINDWEAVE_14B_CONFIG, BindWeaveTransformer
from bindweave.settings.model import ModelSettings, SpeedOptions, VideoSettings
from bindweave.settings.parallel import ParallelSettings
from bindweave.settings.sampling import SamplerSettings, refuse_cfg_parallel_without_guidance
from bindweave.stages import models as stage3_models
from bindweave.stages.engine import Stage3Engine
from bindweave.stages.memory import (JobSize, available_host_gib, cap_gpu_memory, check_host_memory,
                                     gpu_memory_within, plan_memory)
from bindweave.stages.models import model_folders, model_provenance
from bindweave.stages.plan import BuildPlan
from parallel.distributed import Processes, rank_device
from parallel.fsdp import load_sharded_bindweave, shard_t5
from parallel.layout import ParallelLayout, layout_from_config
from parallel.parallelize import parallelize
from parallel.runtime import Runtime

log = logging.getLogger("bindweave")


@dataclass(frozen=True)
class BuildRequest:
    """What a plan is made for: the model settings, the largest job it must hold (``video``: the
    memory plan is for this size), the process layout's settings and the jobs' sampler (CFG
    parallel needs a negative pass: guidance)."""

    model: ModelSettings
    video: VideoSettings
    parallel: ParallelSettings = ParallelSettings()
    sampler: SamplerSettings = SamplerSettings()


def plan_build(request: BuildRequest, processes: Processes = Processes(), facts: DeviceFacts | None = None,
               agree: Callable[[float | None], float | None] = lambda free: free) -> BuildPlan:
    """Every choice of the build, settled once (module docstring); a BindWeaveInputError for any
    combination that cannot run, before a weight is read. ``facts``: the device as probed here
    (None: :func:`probe_device`); ``agree(free_gib)`` makes the ranks of a launch plan alike (the
    app passes the smallest free GPU memory of all ranks: they load and stream the DiT together)."""
    settings = request.model
    dit_folder, wan_folder = model_folders(settings)
    dit_config = read_config(dit_folder, BindWeaveTransformer, BINDWEAVE_14B_CONFIG)
    device = process_device(settings.device, processes)
    layout = layout_from_config(request.parallel, processes.world_size, dit_config["num_attention_heads"], device.type,
                                request.sampler.cfg_passes)
    refuse_cfg_parallel_without_guidance(request.sampler.guidance_scale, layout.cfg)
    if layout.sequence > 1:  # "auto" settles here, so the plan (and each sidecar) names the backend used
        layout = replace(layout, backend=layout.attention_backend(device.type))
    facts = facts or probe_device(device, settings.gpu_memory_gib)
    notes: list[str] = []
    fsdp = layout.fsdp if processes.world_size > 1 else ()
    speed = _resolve_speed(settings, facts, fsdp, notes)
    _refuse_layout_conflicts(settings, layout, speed, device.type)

    # Under FSDP the shards are the memory lever: auto keeps the model resident there.
    memory_mode = "resident" if fsdp and settings.memory == "auto" else settings.memory
    size = job_size(dit_config, request.video, layout.sequence, speed.linear_precision == "fp8")
    memory = plan_memory_for(settings, size, facts, processes.local_world_size, agree, memory_mode)
    if memory.mode == "offload" and speed.linear_precision == "fp8":
        if settings.linear_precision == "fp8":
            raise BindWeaveInputError(
                f"model.linear_precision=fp8 cannot apply with offloaded blocks ({memory.reason}): FP8 weights are "
                f"torchao tensor subclasses that diffusers' group offloading did not return to the host between "
                f"uses (NVIDIA H200, 2026-12-01); use model.linear_precision=auto_fp8 (FP8 where the DiT stays "
                f"resident) or dtype")
        notes.append(f"linear_precision=auto_fp8: linears stay in {settings.dtype}, as the DiT's blocks are offloaded")
        speed = replace(speed, linear_precision="dtype")
        memory = plan_memory_for(settings, replace(size, fp8=False), facts, processes.local_world_size, agree,
                                 memory_mode)
    if memory.offload_encoders and "t5" in fsdp:
        raise BindWeaveInputError("model.memory=auto would offload T5 and CLIP, which cannot apply with "
                                  "parallel.fsdp=[t5]: a sharded T5 stays spread over the GPUs of its group; use "
                                  "parallel.fsdp=[dit] or more GPUs")

    lora_merge = _check_loras(settings, dit_folder)
    dit_loader = "fsdp" if "dit" in fsdp else "host_buffer" if memory.mode == "offload" else "resident"
    return BuildPlan(
        dit_folder=dit_folder, wan_folder=wan_folder, dit_config=dict(dit_config), device=str(device),
        dtype=settings.dtype, speed=speed, memory=memory, dit_loader=dit_loader,
        share_host_buffer=dit_loader == "host_buffer" and processes.local_world_size > 1, fsdp=tuple(fsdp),
        layout=layout, attention_sites=attention_sites(speed.attention, layout, device.type,
                                                                      settings.dtype),
        cache_dir=settings.cache_dir, provenance=model_provenance(dit_folder, wan_folder), notes=tuple(notes),
        loras=tuple(lora_merge.record()) if lora_merge else (), lora_merge=lora_merge)


def build_engine(plan: BuildPlan, runtime: Runtime, gpu_memory_gib: float | None = None) -> Stage3Engine:
    """Load the models as ``plan`` says, in the module docstring's order, and hand them to an engine
    with this process's place in the layout (``runtime``). ``gpu_memory_gib``: the allocator cap the
    plan was made within (model.gpu_memory_gib)."""
    device = torch.device(plan.device)
    cap_gpu_memory(device, gpu_memory_gib)
    if runtime.rank == 0:
        for note in plan.notes:
            log.info("%s", note)
        log.info("build plan: %s (%s)", plan.describe(), plan.memory.reason)
        log.info("attention kernels: %s", "; ".join(f"{site}: {kernel}" for site, kernel in plan.attention_sites.items()))
    fsdp_dit = (lambda folder, dtype: load_sharded_bindweave(
        folder, runtime.fsdp_mesh, dtype, device, fuse=plan.speed.fuse_projections, lora=plan.lora_merge)[0]) \
        if plan.dit_loader == "fsdp" else None
    # Looked up on the module at each build: the tests count and record loads there.
    models = stage3_models.load_stage3_models(
        plan, fsdp_dit=fsdp_dit,
        shard_t5=(lambda module: shard_t5(module, runtime.fsdp_mesh)) if "t5" in plan.fsdp else None,
        share_host_buffer=runtime.share_host_buffer if plan.share_host_buffer else None,
        shard_sequence=lambda model: parallelize(model, runtime))
    return Stage3Engine(models, runtime)


def build_single_process_engine(request: BuildRequest) -> Stage3Engine:
    """The engine of one process (calibrate, the one-process server, the Python API, tests)."""
    plan = plan_build(request)
    return build_engine(plan, Runtime.single_process(torch.device(plan.device)), request.model.gpu_memory_gib)


def process_device(device: str, processes: Processes) -> torch.device:
    """The device this process computes on: ``model.device`` (auto: CUDA if present), and under a
    launch of several processes GPU LOCAL_RANK (one process per GPU)."""
    if device == "auto":
        chosen = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise BindWeaveInputError(f"model.device={device} but no CUDA device is visible here: use model.device=auto "
                                  "(CUDA when present, else CPU) or model.device=cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise BindWeaveInputError(f"model.device={device} but this process sees {torch.cuda.device_count()} CUDA "
                                  f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1}): use model.device=auto")
    if processes.world_size > 1:
        return rank_device(processes, chosen.type)
    return chosen


def probe_device(device: torch.device, gpu_memory_gib: float | None = None) -> DeviceFacts:
    """The facts the plan needs about ``device``, asked once: capability, which optional kernel
    packages import, the GPU memory this process may take (within ``gpu_memory_gib``) and the
    host's available memory."""
    facts = replace(probe_kernel_facts(device), host_available_gib=available_host_gib())
    if device.type != "cuda":
        return facts
    try:
        free_gib = gpu_memory_within(device, gpu_memory_gib, "model.gpu_memory_gib")
    except ValueError as error:
        raise BindWeaveInputError(str(error)) from None
    return replace(facts, free_gib=free_gib, total_gib=torch.cuda.mem_get_info(device)[1] / 2**30)


def job_size(dit_config: dict, video: VideoSettings, sequence_ranks: int = 1, fp8: bool = False) -> JobSize:
    """The memory-deciding size of a job of ``video`` on one rank (its share of the tokens)."""
    _, _, frames, height, width = video.latent_shape
    tokens = video_tokens(dit_config, frames, height, width)
    return JobSize(video_tokens=-(-tokens // sequence_ranks), num_layers=dit_config["num_layers"], fp8=fp8)


def attention_sites(kernel: str, layout: ParallelLayout, device_type: str, dtype_name: str) -> dict[str, str]:
    """The kernel that runs at each attention call site of the DiT under ``layout``, in words."""
    if layout.sequence == 1:
        self_attention = KERNELS[kernel].display
    else:
        backend = layout.attention_backend(device_type)
        local = KERNELS[sequence_local_kernel(backend, kernel, dtype_name)]
        self_attention = (f"{backend} sequence parallel (ring={layout.ring} x ulysses={layout.ulysses}), "
                          f"rank-local {local.display}")
    return {"self_attention": self_attention, "cross_attention": CROSS_ATTENTION}


def _resolve_speed(settings: ModelSettings, facts: DeviceFacts, fsdp: tuple[str, ...], notes: list[str]) -> SpeedOptions:
    """The kernel and the linear precision for this device; FP8 over FSDP shards is refused (explicit)
    or passed over (auto_fp8)."""
    options = settings.speed_options()
    if "dit" in fsdp and options.linear_precision == "fp8":
        raise BindWeaveInputError(
            "model.linear_precision=fp8 cannot apply with parallel.fsdp=[dit]: FP8 weights are not sharded by FSDP2 "
            "here; FP8 already halves the DiT's memory, so use it instead of FSDP (parallel.fsdp=[]), or keep FSDP "
            "with model.linear_precision=dtype (auto_fp8 stays in the model's dtype under FSDP)")
    if "dit" in fsdp and options.linear_precision == "auto_fp8":
        notes.append(f"linear_precision=auto_fp8: linears stay in {settings.dtype} under parallel.fsdp=[dit]")
        options = replace(options, linear_precision="dtype")
    try:
        return resolve_speed_options(options, facts, notes)
    except RuntimeError as error:
        raise BindWeaveInputError(f"model: {error}") from None


def _refuse_layout_conflicts(settings: ModelSettings, layout: ParallelLayout, speed: SpeedOptions,
                             device_type: str) -> None:
    """Speed and memory options the layout cannot honour end the job, saying why (never dropped)."""
    problems = []
    if "t5" in layout.fsdp and settings.offload_encoders:
        problems.append("model.offload_encoders=true cannot apply with parallel.fsdp=[t5]: a sharded T5 stays "
                        "spread over the GPUs of its group; choose one (sharding already saves most of T5's memory)")
    if layout.fsdp and settings.memory == "offload":
        problems.append(f"model.memory=offload cannot apply with parallel.fsdp={list(layout.fsdp)}: a sharded model "
                        "is already spread over the GPUs and its shards cannot also stream from the host; use "
                        "FSDP or offload (model.memory=auto keeps an FSDP layout resident)")
    if layout.sequence > 1:
        backend = layout.attention_backend(device_type)
        local = sequence_local_kernel(backend, speed.attention, settings.dtype)
        explicit = settings.attention_kernel in KERNELS
        if backend not in KERNELS[local].sequence_backends or (explicit and settings.attention_kernel != local):
            problems.append(f"model.attention_kernel={settings.attention_kernel} cannot run under sequence parallel "
                            f"(ring={layout.ring} x ulysses={layout.ulysses}) yet: the {backend} backend runs its own "
                            f"rank-local kernel ({KERNELS[local].display}); use model.attention_kernel=auto (or {local})")
    if problems:
        raise BindWeaveInputError("; ".join(problems))


def _check_loras(settings: ModelSettings, dit_folder):
    """``model.loras`` read from their headers and checked against the DiT's own parameter shapes
    (from its config, on the meta device) before a weight is read; None without LoRAs. Merged into
    the model's dtype by whichever loader fills the DiT, before fusion, FP8 and sharding/offload."""
    if not settings.loras:
        return None
    return LoraMerge.from_settings(settings.loras, parameter_shapes(dit_folder))


def plan_memory_for(settings: ModelSettings, size: JobSize, facts: DeviceFacts, processes_on_host: int = 1,
                    agree: Callable[[float | None], float | None] = lambda free: free, mode: str | None = None):
    """``model.memory`` settled for the free GPU memory (agreed across ranks) and the host memory the
    launch's processes on this machine share; a job that cannot fit is refused. ``mode``: the
    memory mode to plan (None: ``model.memory``)."""
    try:
        free_gib = agree(facts.free_gib)
        plan = plan_memory(mode or settings.memory, free_gib, size, settings.offload_encoders, settings.vae_tiling)
        if facts.type == "cuda":
            check_host_memory(plan, size, processes_on_host, facts.host_available_gib)
        return plan
    except MemoryError as error:
        limit = f" (model.gpu_memory_gib={settings.gpu_memory_gib})" if settings.gpu_memory_gib else ""
        raise BindWeaveInputError(f"model.memory={settings.memory}{limit}: {error}") from None

