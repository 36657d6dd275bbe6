"""Stage 3: a job (a prompt, reference images, Qwen hidden states) -> one MP4 (+ JSON sidecar).

Read top to bottom: settings, loading the models once, a job and its phases (validate,
condition, denoise, decode, write: :func:`generate_sample`), and the meta-JSON loop
(:func:`run_generation`). ``bindweave.stages.engine`` holds the loaded models and runs jobs.
Parallelism (sequence/CFG/data) is applied from outside: this module sees only a
:class:`~bindweave.stages.coordinator.Coordinator` (``parallel.runtime.Runtime`` under torchrun/srun).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from bindweave.io.checkpoint import folder_fingerprint, resolve_folder
from bindweave.encoders.conditioning import (
    ClipImageEncoder,
    T5TextEncoder,
    VideoConditionCache,
    WanVae,
    assemble_condition,
    reference_condition,
)
from bindweave.io.inputs import (Sample, as_hidden_states, load_reference_image, load_sample_hidden_states,
                                 read_meta, to_rgb)
from bindweave.errors import BindWeaveInputError
from bindweave.model.fp8 import fp8_layer_names, layer_patterns
from bindweave.settings.model import ModelSettings, VideoSettings
from bindweave.model.speed import apply_speed_options
from bindweave.io.outputs import latents_path, video_done, write_json, write_latents, write_mp4
from bindweave.encoders.prompts import T5_NEGATIVE_PROMPT
from bindweave.stages.memory import (JobSize, MemoryPlan, available_host_gib, check_host_memory, limit_gpu_memory,
                                     memory_snapshot, peak_of, plan_memory)
from bindweave.stages.resume import bytes_sha256, file_sha256, sample_recipe
from bindweave.sampling.sampler import Step, denoise, initial_noise, make_scheduler
from bindweave.settings.sampling import CacheSettings, SamplerSettings
from bindweave.sampling.step_cache import BlockCache, build_step_cache
from bindweave.model.host_buffer import HostBuffer
from bindweave.model.loading import load_bindweave_to_host_buffer, load_bindweave_transformer
from bindweave.model.transformer import BindWeaveTransformer
from bindweave.stages.coordinator import Coordinator, SingleProcess

log = logging.getLogger("bindweave")


@dataclass(frozen=True)
class RunSettings:
    meta_path: Path
    image_root: Path | None
    output_dir: Path
    overwrite: bool = False
    on_error: str = "fail"  # "fail": stop at the first bad sample; "skip": report it, go on, exit non-zero
    progress: bool = True


@dataclass
class Stage3Models:
    """Everything loaded once per process and reused across samples (and sweep jobs)."""

    transformer: BindWeaveTransformer
    vae: WanVae
    text_encoder: T5TextEncoder
    image_encoder: ClipImageEncoder
    video_conditions: VideoConditionCache
    device: torch.device
    provenance: dict = field(default_factory=dict)
    negative_t5: torch.Tensor | None = None
    offload_encoders: bool = False  # T5 + CLIP live on the CPU between uses (GPU memory for the DiT)
    # The kernel that runs at each attention call site once the layout is applied (sidecars, log).
    attention_kernels: dict = field(default_factory=dict)
    load_s: float = 0.0  # seconds this process spent loading them (sidecars: once per process, reused after)
    recipe_options: dict = field(default_factory=dict)  # the settings that change the pixels (resume.py)
    fp8_layers: list = field(default_factory=list)  # the DiT's linear layers stored and run in FP8
    memory_plan: MemoryPlan | None = None  # how the DiT is held (resident, or its blocks streamed in)

    def encoders_to(self, device: torch.device) -> None:
        if self.offload_encoders:
            self.text_encoder.model.to(device)
            self.image_encoder.model.to(device)

    @property
    def hidden_dim(self) -> int:
        return self.transformer.config.mllm_dim


def model_folders(settings: ModelSettings) -> tuple[Path, Path]:
    """The DiT folder and the Wan folder (HF repo ids resolved through the local cache first)."""
    if settings.tiny_root:
        from bindweave.testing.tiny import write_tiny_models

        tiny = write_tiny_models(Path(settings.tiny_root))
        return tiny.bindweave, tiny.wan
    return resolve_folder(settings.dit, settings.dit_subfolder, settings.revision), resolve_folder(settings.wan)


def model_provenance(dit_folder: Path, wan_folder: Path) -> dict:
    return {"dit": folder_fingerprint(dit_folder), "wan": folder_fingerprint(wan_folder)}


def recipe_options(settings: ModelSettings) -> dict:
    """The model settings that change a video's pixels (resume compares them; resume.py). FP8 is
    listed only when on, so the videos of exact runs made before it existed still resume."""
    options = {"dtype": settings.dtype, "attention_kernel": settings.attention_kernel,
               "fuse_projections": settings.fuse_projections, "compile": settings.compile}
    if settings.linear_precision != "dtype":
        options["linear_precision"] = settings.linear_precision
    return options


def job_recipe_options(model_options: dict, cache: CacheSettings) -> dict:
    """The model's recipe options plus the job's step cache (listed only when on, as above)."""
    return model_options if cache.kind == "none" else {**model_options, "cache": cache.recipe()}


def job_size(settings: ModelSettings, video: VideoSettings, dit_config: dict, sequence_ranks: int = 1) -> JobSize:
    """The memory-deciding size of a job of ``video`` on one rank (its share of the tokens)."""
    from bindweave.model.flops import video_tokens

    _, _, frames, height, width = video.latent_shape
    tokens = video_tokens(dit_config, frames, height, width)
    return JobSize(video_tokens=-(-tokens // sequence_ranks), num_layers=dit_config["num_layers"],
                   fp8=settings.linear_precision != "dtype")


def memory_plan_for(settings: ModelSettings, size: JobSize, device: torch.device,
                    processes_on_host: int = 1, agree: Callable[[float | None], float | None] = lambda free: free
                    ) -> MemoryPlan:
    """``model.memory`` settled for this device's free memory within ``model.gpu_memory_gib`` (the
    allocator is capped there first; logged once by the caller) and for the host memory the
    ``processes_on_host`` processes of the launch share; a job that cannot fit is a
    BindWeaveInputError before anything loads. ``agree(free_gib)`` makes the ranks of a launch plan
    alike (the app passes the smallest free memory of all ranks: they load the DiT together)."""
    try:
        free_gib = agree(limit_gpu_memory(device, settings.gpu_memory_gib, "model.gpu_memory_gib"))
        plan = plan_memory(settings.memory, free_gib, size, settings.offload_encoders, settings.vae_tiling)
        if device.type == "cuda":
            check_host_memory(plan, size, processes_on_host, available_host_gib())
        if plan.mode == "offload" and settings.linear_precision == "fp8":
            raise BindWeaveInputError(
                f"model.linear_precision=fp8 cannot apply with offloaded blocks ({plan.reason}): FP8 weights are "
                f"torchao tensor subclasses that diffusers' group offloading did not return to the host between "
                f"uses (NVIDIA H200, 2026-12-01); use model.linear_precision=auto_fp8 (FP8 where the DiT stays "
                f"resident) or dtype")
        return plan
    except ValueError as error:
        raise BindWeaveInputError(str(error)) from None
    except MemoryError as error:
        limit = f" (model.gpu_memory_gib={settings.gpu_memory_gib})" if settings.gpu_memory_gib else ""
        raise BindWeaveInputError(f"model.memory={settings.memory}{limit}: {error}") from None


def load_stage3_models(settings: ModelSettings, build_dit: Callable | None = None,
                       shard_t5: Callable | None = None, memory_plan: MemoryPlan | None = None,
                       share_host_buffer: Callable | None = None) -> Stage3Models:
    """Every stage-3 model, once per process, with the DiT's speed options (bindweave.model.speed).

    ``build_dit(folder, dtype, device)`` replaces the DiT loader and ``shard_t5(module)`` shards T5
    after loading: the app passes parallel/fsdp.py's for FSDP (the DiT built on the meta device,
    its projections fused there if asked, each rank reading only its shards); the other speed
    options then apply to the sharded DiT, but FP8 cannot (the app refuses it before loading;
    here it is an error). ``memory_plan`` (bindweave.stages.memory; None: all resident as the
    settings say) may offload the DiT's blocks, the encoders and tile the decode; an offloaded DiT's
    host buffer comes from ``share_host_buffer(nbytes, fill)`` (the app passes parallel.runtime's:
    one per machine for the launch's processes there; None: this process's own).
    """
    started = time.perf_counter()
    dit_folder, wan_folder = model_folders(settings)
    device, dtype = settings.resolved_device(), settings.torch_dtype
    plan = memory_plan or MemoryPlan("resident", settings.offload_encoders, settings.vae_tiling, 0.0, "as set")
    offload_dit = plan.mode == "offload" and build_dit is None  # FSDP + offload is refused before loading
    if build_dit is not None:
        if settings.linear_precision == "fp8":
            raise BindWeaveInputError("model.linear_precision=fp8 cannot apply with parallel.fsdp=[dit]")
        transformer = build_dit(dit_folder, dtype, device)
        options = replace(settings.speed_options(), linear_precision="dtype")  # auto_fp8: not over shards
    else:
        # Offloaded, the DiT stays on the host, in one page-locked buffer its blocks stream from, in
        # the model's dtype (FP8 was refused with offload before loading; auto_fp8 falls back here).
        transformer = load_bindweave_to_host_buffer(dit_folder, dtype, fuse=settings.fuse_projections,
                                                    pinned=device.type == "cuda",
                                                    share=share_host_buffer) if offload_dit \
            else load_bindweave_transformer(dit_folder, dtype=dtype, device=device)
        options = settings.speed_options()
        if offload_dit:
            log_host_buffer(transformer.host_buffer)
        if offload_dit and options.linear_precision == "auto_fp8":
            log.info("linear_precision=auto_fp8: linears stay in %s, as the DiT's blocks are offloaded", settings.dtype)
            options = replace(options, linear_precision="dtype")
    apply_speed_options(transformer, options, offload_to=device if offload_dit else None)
    offload_encoders = settings.offload_encoders or plan.offload_encoders
    if offload_encoders and shard_t5 is not None:  # refused with the reason before loading (app)
        raise BindWeaveInputError("model.offload_encoders cannot apply with parallel.fsdp=[t5]")
    # Offloaded encoders start on the CPU: they come to the GPU only while a sample is conditioned.
    encoder_device = torch.device("cpu") if offload_encoders else device
    text_encoder = T5TextEncoder.from_folder(wan_folder, dtype=dtype, device=encoder_device)
    if shard_t5 is not None:
        shard_t5(text_encoder.model)
    return Stage3Models(
        transformer=transformer,
        vae=WanVae.from_folder(wan_folder, dtype=torch.float32 if device.type == "cpu" else dtype, device=device,
                               tiled=settings.vae_tiling or plan.vae_tiling),
        text_encoder=text_encoder,
        image_encoder=ClipImageEncoder.from_folder(wan_folder, dtype=dtype, device=encoder_device),
        video_conditions=VideoConditionCache(Path(settings.cache_dir) / "video_condition"),
        device=device,
        provenance=model_provenance(dit_folder, wan_folder),
        recipe_options=recipe_options(settings),
        fp8_layers=fp8_layer_names(transformer),
        memory_plan=plan,
        offload_encoders=offload_encoders,
        load_s=time.perf_counter() - started,
    )


def log_host_buffer(host: HostBuffer | None) -> None:
    """Where the offloaded DiT's blocks wait: this process's own buffer, or one shared on the machine."""
    if host is None:
        log.info("the DiT's blocks wait in host memory: this process's own page-locked buffer")
    elif host.handle.pid == os.getpid():
        log.info("the DiT's blocks wait in host memory: %.2f GiB read from the files by this process, shared "
                 "with the launch's other processes on this machine", host.handle.nbytes / 2**30)
    else:
        log.info("the DiT's blocks wait in host memory: %.2f GiB shared with process %d on this machine (no second "
                 "copy)", host.handle.nbytes / 2**30, host.handle.pid)


@dataclass(frozen=True)
class Stage3Job:
    """One video to make: an in-memory request. ``sample`` names it and carries the prompt, the
    reference image paths, the hidden-state paths and the sample's own seed (a meta JSON entry, or
    one built by :meth:`from_request`); ``images`` / ``hidden_states`` given here replace the files.
    ``output_path``: the MP4 (its sidecar beside it); None: nothing is written, the frames are returned."""

    sample: Sample
    video: VideoSettings
    sampler: SamplerSettings
    output_path: Path | None
    images: tuple[Image.Image, ...] | None = None
    hidden_states: tuple[torch.Tensor, torch.Tensor] | None = None  # positive, negative: [1, L, mllm_dim]
    cache: CacheSettings = CacheSettings()  # step caching (bindweave.sampling.step_cache); off by default

    @classmethod
    def from_request(cls, sample_id: str, prompt: str, video: VideoSettings, sampler: SamplerSettings,
                     output_path: Path | None, images: list = (), hidden_states: tuple | None = None,
                     seed: int | None = None, cache: CacheSettings = CacheSettings()) -> Stage3Job:
        """A job from values: ``images`` are paths or PIL images (all of one kind); ``hidden_states``
        a (positive, negative) pair of paths or of tensors."""
        in_memory_images = bool(images) and not isinstance(images[0], (str, Path))
        in_memory_states = hidden_states is not None and isinstance(hidden_states[0], torch.Tensor)
        sample = Sample(
            sample_id=sample_id, prompt=prompt,
            image_paths=() if in_memory_images else tuple(Path(p) for p in images),
            hidden_states_path=None if in_memory_states or hidden_states is None else Path(hidden_states[0]),
            hidden_states_path_negative=None if in_memory_states or hidden_states is None else Path(hidden_states[1]),
            seed=seed, fields={})
        return cls(sample, video, sampler, output_path, images=tuple(images) if in_memory_images else None,
                   hidden_states=tuple(hidden_states) if in_memory_states else None, cache=cache)

    @property
    def sample_id(self) -> str:
        return self.sample.sample_id

    def input_hashes(self) -> dict[str, list[str]]:
        """sha256 of each reference image and hidden-states input (files, or in-memory content):
        what resume compares (bindweave.stages.resume)."""
        if self.images is not None:
            images = [bytes_sha256(to_rgb(image).tobytes()) for image in self.images]
        else:
            images = [file_sha256(path) for path in self.sample.image_paths]
        if self.hidden_states is not None:
            states = [bytes_sha256(state.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                      for state in self.hidden_states]
        else:
            states = [file_sha256(path) for path in (self.sample.hidden_states_path,
                                                     self.sample.hidden_states_path_negative) if path]
        return {"images": images, "hidden_states": states}

    def reference_images(self) -> list[Image.Image]:
        if self.images is not None:
            return [to_rgb(image) for image in self.images]
        return [load_reference_image(path) for path in self.sample.image_paths]

    def qwen_states(self, hidden_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hidden_states is not None:
            return tuple(as_hidden_states(state, f"job {self.sample_id!r}: hidden_states[{side}]", hidden_dim)
                         for side, state in enumerate(self.hidden_states))
        return load_sample_hidden_states(self.sample, hidden_dim=hidden_dim)


@dataclass(frozen=True)
class JobProgress:
    """Where a job is: its phase (validate, condition, denoise, decode, write, done) and, while
    denoising, step ``step`` of ``num_steps`` done."""

    sample_id: str
    phase: str
    step: int = 0
    num_steps: int = 0

    @property
    def percent(self) -> float:
        """Of the whole job, counting denoising as all of it (it is ~97 % of the time at 720P)."""
        if self.phase in ("decode", "write", "done"):
            return 100.0 if self.phase == "done" else 99.0
        return 100.0 * self.step / self.num_steps if self.num_steps else 0.0


class JobCancelled(Exception):
    """The job's cancel event was set; it stopped between two steps, nothing written."""


ProgressFn = Callable[[JobProgress], None]


@dataclass
class SampleInputs:
    """The DiT's inputs for one sample; text inputs per CFG side."""

    t5: dict[str, torch.Tensor]
    qwen: dict[str, torch.Tensor]
    clip_embeds: torch.Tensor
    condition: torch.Tensor


def job_of(source: Sample | Stage3Job, video: VideoSettings) -> Stage3Job:
    """A meta-JSON sample as a job (inputs read from its files)."""
    return source if isinstance(source, Stage3Job) else Stage3Job(source, video, SamplerSettings(), None)


@torch.no_grad()
def prepare_inputs(models: Stage3Models, source: Sample | Stage3Job, video: VideoSettings) -> SampleInputs:
    """SPEC §5: T5 (positive + cached negative), the Qwen states, reference canvases -> CLIP tokens
    and VAE latents, the cached all-zero video condition. ``source``: a meta-JSON sample or a job."""
    job = job_of(source, video)
    device, dtype = models.device, models.transformer.dtype
    # First, while T5 and CLIP may still be on the CPU: the 81-frame VAE encode is the largest
    # activation of conditioning (8 GiB at 720P), and it is computed once per resolution.
    video_condition = models.video_conditions.get(models.vae, video.num_frames, video.height, video.width)
    models.encoders_to(device)
    try:
        return _encode_inputs(models, job, video, video_condition, device, dtype)
    finally:
        models.encoders_to(torch.device("cpu"))


def _encode_inputs(models: Stage3Models, job: Stage3Job, video: VideoSettings, video_condition: torch.Tensor,
                   device: torch.device, dtype: torch.dtype) -> SampleInputs:
    images = job.reference_images()
    qwen_positive, qwen_negative = job.qwen_states(models.hidden_dim)
    if models.negative_t5 is None:
        models.negative_t5 = models.text_encoder.encode([T5_NEGATIVE_PROMPT])
    clip_embeds, reference_latents = reference_condition(
        images, models.vae, models.image_encoder, width=video.width, height=video.height,
        max_references=models.transformer.config.max_references,
    )
    condition = assemble_condition(reference_latents.to(video_condition.device), video_condition)
    return SampleInputs(
        t5={"positive": models.text_encoder.encode([job.sample.prompt]).to(device, dtype),
            "negative": models.negative_t5.to(device, dtype)},
        qwen={"positive": qwen_positive.to(device, dtype), "negative": qwen_negative.to(device, dtype)},
        clip_embeds=clip_embeds.to(device, dtype),
        condition=condition.to(device, dtype),
    )


def dit_predictor(transformer: BindWeaveTransformer, inputs: SampleInputs, step_cache=None):
    """One DiT forward for one CFG side; both sides share the image conditions (SPEC §6).
    ``step_cache`` (``for_step(step)`` -> the blocks' stand-in) may skip the blocks at some steps."""

    @torch.no_grad()
    def predict(latents: torch.Tensor, step: Step) -> torch.Tensor:
        cached: dict[str, BlockCache] = {} if step_cache is None else {"block_cache": step_cache.for_step(step)}
        return transformer(
            latents.to(transformer.dtype), step.timestep.to(latents.device), t5_embeds=inputs.t5[step.side],
            qwen_states=inputs.qwen[step.side], clip_embeds=inputs.clip_embeds, condition=inputs.condition,
            **cached,
        )

    return predict


def speed_record(models: Stage3Models, step_cache) -> dict:
    """What ran, for the sidecar: the kernels per call site, the layers in FP8, the steps skipped."""
    return {
        "attention_kernels": models.attention_kernels,
        "fp8_linears": {"count": len(models.fp8_layers), "layers": layer_patterns(models.fp8_layers)},
        "step_cache": step_cache.record() if hasattr(step_cache, "record") else None,
    }


def bars_on_terminal() -> bool:
    """Progress bars only where a person watches: redirected logs (Slurm, nohup, CI) would fill
    with their carriage returns and escape codes."""
    return sys.stderr.isatty()


def progress_bar(items, progress: bool, **options):
    return tqdm(items, **options) if progress and bars_on_terminal() else items


def sample_seed(sample: Sample, sampler: SamplerSettings) -> int:
    return sampler.seed if sample.seed is None else sample.seed


def seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def versions() -> dict:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def generate_sample(models: Stage3Models, job: Stage3Job, progress: bool = True, runtime: Coordinator | None = None,
                    on_progress: ProgressFn | None = None, cancel: threading.Event | None = None,
                    write_video=write_mp4, step_cache=None) -> dict | None:
    """Make one video in phases (condition, denoise, decode, write); returns its sidecar record.

    Under a parallel ``runtime`` every rank of the sample's group conditions and denoises (its
    share of the tokens / its CFG side) and decodes; the group's writer writes, and the others
    return None. ``on_progress`` hears each phase and each finished step; a set ``cancel`` stops the
    job between two steps (:class:`JobCancelled`), before anything is written. With
    ``job.output_path`` None nothing is written and the record holds the frames (``"frames"``).
    ``step_cache`` replaces the job's own (``job.cache``): calibration passes its statistics here.
    """
    runtime = runtime or SingleProcess()
    sample, video, sampler = job.sample, job.video, job.sampler
    report = on_progress or (lambda update: None)
    timings, memory = {}, {}
    started = time.perf_counter()
    report(JobProgress(sample.sample_id, "condition", 0, sampler.num_steps))
    inputs = prepare_inputs(models, job, video)
    timings["conditioning_s"] = time.perf_counter() - started
    memory["conditioning"] = memory_snapshot(models.device)

    seed = sample_seed(sample, sampler)
    noise = initial_noise(video.latent_shape, seed).to(models.device)
    step_cache = step_cache if step_cache is not None else build_step_cache(job.cache, sampler.num_steps)
    velocity = runtime.guided_velocity(dit_predictor(models.transformer, inputs, step_cache), sampler.guidance_scale)

    def steps(timesteps):
        shown = progress_bar(timesteps, progress, desc=f"{sample.sample_id} steps", leave=False)
        for index, timestep in enumerate(shown):
            if cancel is not None and cancel.is_set():
                raise JobCancelled(f"{sample.sample_id}: cancelled after {index} of {sampler.num_steps} steps")
            yield timestep
            report(JobProgress(sample.sample_id, "denoise", index + 1, sampler.num_steps))
            if progress and not bars_on_terminal():  # a redirected log gets one plain line per step
                log.info("%s: step %d/%d (%.1f s)", sample.sample_id, index + 1, sampler.num_steps,
                         time.perf_counter() - mark)
            if index == 0:  # the first step is done: it includes compiling; from process start, loading too
                timings["first_step_s"] = time.perf_counter() - mark
                timings.setdefault("first_step_since_process_start_s", seconds_since_process_start())

    mark = time.perf_counter()
    latents = denoise(noise, make_scheduler(sampler), velocity, progress=steps)
    timings["denoise_s"] = time.perf_counter() - mark
    memory["denoise"] = memory_snapshot(models.device)
    speed = speed_record(models, step_cache)
    if speed["step_cache"] is not None and runtime.is_writer:
        cache = speed["step_cache"]
        log.info("%s: step cache %s skipped %d of %d DiT forwards (%s)", sample.sample_id, cache["kind"],
                 cache["forwards_skipped"], cache["forwards_skipped"] + cache["forwards_run"], cache["calibration"])

    # Every rank of the sample's group takes part in the decode (the whole video each, or its band of
    # rows with parallel.decode=split); the writer check comes after it.
    report(JobProgress(sample.sample_id, "decode", sampler.num_steps, sampler.num_steps))
    mark = time.perf_counter()
    frames = runtime.decode(models.vae, latents)
    timings["decode_s"] = time.perf_counter() - mark
    memory["decode"] = memory_snapshot(models.device)
    if not runtime.is_writer:
        return None
    record = {
        "sample_id": sample.sample_id, "prompt": sample.prompt, "seed": seed,
        "num_steps": sampler.num_steps, "guidance_scale": sampler.guidance_scale,
        "resolution": asdict(video), "images": [str(p) for p in sample.image_paths],
        "hidden_states": [str(p) for p in (sample.hidden_states_path, sample.hidden_states_path_negative) if p],
        "sample_fields": sample.fields, "models": models.provenance, "timings": timings,
        "memory": memory, "peak_memory_gib": peak_of(memory),
        "versions": versions(), "parallel": runtime.layout_record(), "attention_kernels": models.attention_kernels,
        "speed": speed,
        "memory_options": {"offload_encoders": models.offload_encoders, "vae_tiling": models.vae.model.use_tiling,
                           "dit": models.memory_plan.record() if models.memory_plan else None},
        "recipe": sample_recipe(sample.prompt, job.input_hashes(), seed, video, sampler, models.provenance,
                                job_recipe_options(models.recipe_options, job.cache)),
    }
    if job.output_path is None:
        timings["total_s"] = time.perf_counter() - started
        report(JobProgress(sample.sample_id, "done", sampler.num_steps, sampler.num_steps))
        return {**record, "frames": frames}

    report(JobProgress(sample.sample_id, "write", sampler.num_steps, sampler.num_steps))
    mark = time.perf_counter()
    # Redone (overwrite=true): the old sidecar goes first, so an old record never sits beside a new video
    # (the latents file comes before the sidecar too: a sidecar marks all three as finished).
    job.output_path.with_suffix(".json").unlink(missing_ok=True)
    write_video(job.output_path, frames, fps=video.fps)
    write_latents(latents_path(job.output_path), latents)
    timings["write_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started
    timings["load_models_s"] = models.load_s
    # The sidecar is written last: its presence marks the sample as finished (resume).
    write_json(job.output_path.with_suffix(".json"), record)
    report(JobProgress(sample.sample_id, "done", sampler.num_steps, sampler.num_steps))
    return record


def run_generation(models: Stage3Models, run: RunSettings, video: VideoSettings, sampler: SamplerSettings,
                   runtime: Coordinator | None = None, known_bad: dict[str, str] | None = None,
                   cache: CacheSettings = CacheSettings()) -> dict:
    """All samples of the meta JSON in sorted order (under a ``runtime``, this data group's share of
    them); finished ones are skipped unless overwrite. ``known_bad`` (sample id -> reason; found by
    the check before loading, on_error=skip) are counted as failed and not run."""
    known_bad = known_bad or {}
    runtime = runtime or SingleProcess()

    def output_path_of(sample: Sample) -> Path:
        return run.output_dir / f"{sample.sample_id}.mp4"

    def plan() -> tuple[list[Sample], set[str], dict[str, str]]:
        invalid: dict[str, str] = {}
        samples = read_meta(run.meta_path, run.image_root, invalid=invalid if run.on_error == "skip" else None)
        for sample_id, error in invalid.items():
            if sample_id not in known_bad:
                log.error("%s: %s (skipped; on_error=skip)", sample_id, error)
        samples = [sample for sample in samples if sample.sample_id not in known_bad]
        return samples, {sample.sample_id for sample in samples if video_done(output_path_of(sample))}, invalid

    # Rank 0 reads the meta file and looks for finished outputs; every rank follows that one plan,
    # so the ranks sharing a sample never disagree about skipping it.
    samples, finished, invalid = runtime.from_rank0(plan)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    summary = {"done": [], "skipped": [], "failed": {**invalid, **known_bad}}
    for sample in progress_bar(runtime.own_samples(samples), run.progress, desc="samples"):
        output_path = output_path_of(sample)
        if sample.sample_id in finished and not run.overwrite:
            if runtime.is_writer:
                log.info("%s: already done (%s), skipping; overwrite=true redoes it", sample.sample_id, output_path)
            summary["skipped"].append(sample.sample_id)
            continue
        try:
            record = generate_sample(models, Stage3Job(sample, video, sampler, output_path, cache=cache),
                                     progress=run.progress, runtime=runtime)
        except BindWeaveInputError as error:
            if run.on_error != "skip":
                raise
            if runtime.is_writer:  # every rank of the group read the same inputs and failed alike
                log.error("%s: %s (skipped; on_error=skip)", sample.sample_id, error)
            summary["failed"][sample.sample_id] = str(error)
            continue
        summary["done"].append(sample.sample_id)
        if record is not None:
            log.info("%s: %.1f s, peak memory %.2f GiB -> %s", sample.sample_id, record["timings"]["total_s"],
                     record["peak_memory_gib"], output_path)
    # Every rank reports its own memory once (non-writers write no sidecar).
    summary["rank_report"] = {"rank": runtime.rank, **memory_snapshot(models.device)}
    log.info("rank %d memory: %s", runtime.rank, summary["rank_report"])
    summary["output_dir"] = str(run.output_dir)
    return summary
