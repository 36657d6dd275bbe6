"""Stage 3's models, loaded once per process exactly as the build plan says (bindweave/stages/plan.py).

The plan (bindweave/app/build.py ``plan_build``) has settled every choice before this module
reads a weight; here the DiT comes from the planned loader (resident, the host buffer of an
offloaded DiT, or FSDP shards through the app's ``fsdp_dit``), gets its speed options in
bindweave.model.speed's one order, and T5, CLIP and the VAE load where the memory plan puts them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bindweave.encoders.conditioning import ClipImageEncoder, T5TextEncoder, VideoConditionCache, WanVae
from bindweave.io.checkpoint import folder_fingerprint, resolve_folder
from bindweave.model.fp8 import fp8_layer_names
from bindweave.model.host_buffer import HostBuffer
from bindweave.model.loading import load_bindweave_to_host_buffer, load_bindweave_transformer
from bindweave.model.speed import apply_speed_options
from bindweave.model.transformer import BindWeaveTransformer
from bindweave.settings.model import ModelSettings
from bindweave.stages.plan import BuildPlan

log = logging.getLogger("bindweave")


@dataclass
class Stage3Models:
    """Everything loaded once per process and reused across samples (and sweep jobs), as ``plan`` said."""

    transformer: BindWeaveTransformer
    vae: WanVae
    text_encoder: T5TextEncoder
    image_encoder: ClipImageEncoder
    video_conditions: VideoConditionCache
    plan: BuildPlan
    negative_t5: torch.Tensor | None = None
    load_s: float = 0.0  # seconds this process spent loading them (sidecars: once per process, reused after)
    lora_merge_s: float = 0.0  # of which merging model.loras into the DiT's tensors as they were read
    fp8_layers: list = field(default_factory=list)  # the DiT's linear layers stored and run in FP8

    @property
    def device(self) -> torch.device:
        return torch.device(self.plan.device)

    @property
    def offload_encoders(self) -> bool:
        """T5 + CLIP live on the CPU between uses (GPU memory for the DiT)."""
        return self.plan.memory.offload_encoders

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


def load_stage3_models(plan: BuildPlan, fsdp_dit: Callable | None = None, shard_t5: Callable | None = None,
                       share_host_buffer: Callable | None = None,
                       shard_sequence: Callable | None = None) -> Stage3Models:
    """Every stage-3 model, once per process, exactly as ``plan`` says (it re-checks nothing: the
    plan refused what cannot run). The DiT comes from the planned loader: ``resident``, the
    ``host_buffer`` its offloaded blocks stream from (``share_host_buffer(nbytes, fill)``: the app's
    one buffer per machine; None: this process's own), or ``fsdp`` (``fsdp_dit(folder, dtype)``:
    parallel/fsdp.py's sharded loading, projections fused on the meta model). Then its speed
    options in bindweave.model.speed's order, ``shard_sequence(model)`` wrapping the kernel before
    the blocks compile; ``shard_t5(module)`` shards T5 after it loads.
    """
    started = time.perf_counter()
    device, dtype = torch.device(plan.device), getattr(torch, plan.dtype)
    merged_before = plan.lora_merge.merge_s if plan.lora_merge else 0.0  # a plan may be loaded more than once
    if plan.dit_loader == "fsdp":
        transformer = fsdp_dit(plan.dit_folder, dtype)
    elif plan.dit_loader == "host_buffer":
        transformer = load_bindweave_to_host_buffer(plan.dit_folder, dtype, fuse=plan.speed.fuse_projections,
                                                    pinned=device.type == "cuda", share=share_host_buffer,
                                                    lora=plan.lora_merge)
        log_host_buffer(transformer.host_buffer)
    else:
        transformer = load_bindweave_transformer(plan.dit_folder, dtype=dtype, device=device, lora=plan.lora_merge)
    apply_speed_options(transformer, plan.speed, offload_to=device if plan.offload_dit else None,
                        shard_sequence=shard_sequence)
    # Offloaded encoders start on the CPU: they come to the GPU only while a sample is conditioned.
    encoder_device = torch.device("cpu") if plan.memory.offload_encoders else device
    text_encoder = T5TextEncoder.from_folder(plan.wan_folder, dtype=dtype, device=encoder_device)
    if shard_t5 is not None:
        shard_t5(text_encoder.model)
    lora_merge_s = plan.lora_merge.merge_s - merged_before if plan.lora_merge else 0.0
    if plan.lora_merge:
        log.info("merged %d LoRA file(s) into the DiT in %.1f s, as its tensors were read", len(plan.loras),
                 lora_merge_s)
    return Stage3Models(
        transformer=transformer,
        vae=WanVae.from_folder(plan.wan_folder, dtype=torch.float32 if device.type == "cpu" else dtype, device=device,
                               tiled=plan.memory.vae_tiling),
        text_encoder=text_encoder,
        image_encoder=ClipImageEncoder.from_folder(plan.wan_folder, dtype=dtype, device=encoder_device),
        video_conditions=VideoConditionCache(Path(plan.cache_dir) / "video_condition"),
        plan=plan,
        fp8_layers=fp8_layer_names(transformer),
        load_s=time.perf_counter() - started,
        lora_merge_s=lora_merge_s,
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
