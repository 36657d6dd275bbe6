"""The resolved build plan of stage 3: every choice about how the models are held and run, settled
once before a weight is read (bindweave/app/build.py ``plan_build`` decides; this is what it decided).

The loaders, the speed options and the layout take the plan as it is and re-check nothing; the
sidecar (``record()``), the log line (``describe()``) and the resume recipe (``recipe_options()``)
state the plan, not a re-derivation of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from bindweave.settings.model import SpeedOptions
from bindweave.stages.memory import MemoryPlan

DIT_LOADERS = ("resident", "host_buffer", "fsdp")  # bindweave.model.loading / parallel/fsdp.py


@dataclass(frozen=True)
class BuildPlan:
    dit_folder: Path
    wan_folder: Path
    dit_config: dict  # the DiT's config.json (heads, widths, depth)
    device: str  # where the models compute: cpu, cuda:N
    dtype: str
    speed: SpeedOptions  # resolved: a registry kernel, linear_precision dtype or fp8
    memory: MemoryPlan  # resident or offloaded DiT, encoders offloaded, tiled decode
    dit_loader: str  # one of DIT_LOADERS
    share_host_buffer: bool  # offloaded DiT: one host buffer for the launch's processes on this machine
    fsdp: tuple[str, ...]  # the models FSDP2 shards (dit, t5); () on one process
    layout: object  # the process layout (parallel.layout.ParallelLayout, backend settled; stages never import parallel/)
    attention_sites: dict  # call site -> the kernel that runs there, in words
    cache_dir: str
    provenance: dict  # the weights' folder fingerprints (resume, sidecars)
    notes: tuple[str, ...] = ()  # every fallback an auto choice took, and why (logged once)
    loras: tuple[dict, ...] = field(default=())  # each adapter merged at load: path, sha256, strength, parameters
    # The checked LoRA set the loaders merge (bindweave.model.lora.LoraMerge; None: no LoRA); ``loras`` states it.
    lora_merge: object = field(default=None, compare=False, repr=False)

    @property
    def offload_dit(self) -> bool:
        return self.memory.mode == "offload"

    @property
    def hidden_dim(self) -> int:
        return self.dit_config["mllm_dim"]

    @property
    def fp8(self) -> bool:
        return self.speed.linear_precision == "fp8"

    def record(self) -> dict:
        """The plan as a sidecar states it (JSON types)."""
        return {
            "device": self.device, "dtype": self.dtype,
            "attention": {"kernel": self.speed.attention, "sites": dict(self.attention_sites)},
            "fuse_projections": self.speed.fuse_projections, "linear_precision": self.speed.linear_precision,
            "compile": self.speed.compile, "memory": self.memory.record(), "dit_loader": self.dit_loader,
            "share_host_buffer": self.share_host_buffer, "fsdp": list(self.fsdp), "layout": {**asdict(self.layout), "fsdp": list(self.layout.fsdp)},
            "loras": [dict(lora) for lora in self.loras], "notes": list(self.notes),
        }

    def recipe_options(self) -> dict:
        """What of the plan changes a video's pixels (resume compares it; bindweave/stages/resume.py).
        FP8 and LoRAs are listed only when on, so the videos of exact runs made before they existed
        still resume."""
        options = {"dtype": self.dtype, "attention_kernel": self.speed.attention,
                   "fuse_projections": self.speed.fuse_projections, "compile": self.speed.compile}
        if self.fp8:
            options["linear_precision"] = "fp8"
        if self.loras:
            options["loras"] = [{"sha256": lora["sha256"], "strength": lora["strength"]}
                                for lora in self.loras]
        return options

    def describe(self) -> str:
        """One log line: what runs, where, held how."""
        sharded = f", FSDP {'+'.join(self.fsdp)}" if self.fsdp else ""
        fp8 = ", FP8 linears" if self.fp8 else ""
        return (f"{self.device} {self.dtype}: self-attention {self.attention_sites['self_attention']}{fp8}"
                f"{', fused projections' if self.speed.fuse_projections else ''}"
                f"{', compiled blocks' if self.speed.compile else ''}; DiT {self.memory.mode} "
                f"({self.dit_loader} loader{sharded}){', T5 + CLIP offloaded' if self.memory.offload_encoders else ''}"
                f"{', tiled decode' if self.memory.vae_tiling else ''}"
                + "".join(f", LoRA {lora['path']} x{lora['strength']}" for lora in self.loras))
