"""Stage-3 settings: the weights and how to hold and run them (``model.*``), the video (``video.*``),
and the DiT's speed options."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bindweave.errors import BindWeaveInputError
from bindweave.model.kernels import KERNEL_CHOICES
from bindweave.settings.lora import LoraSettings

if TYPE_CHECKING:
    import torch

MODEL_DTYPES = ("bfloat16", "float16", "float32")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
ATTENTION_CHOICES = KERNEL_CHOICES  # the kernels' registry and its auto policies (bindweave/model/kernels.py)
LINEAR_PRECISIONS = ("dtype", "fp8", "auto_fp8")  # bindweave/model/fp8.py
MEMORY_MODES = ("auto", "resident", "offload")  # bindweave/stages/memory.py


@dataclass(frozen=True)
class SpeedOptions:
    """The DiT's speed options, their defaults held here once (``model.*`` takes them from here).

    ``attention``: a kernel of the registry (bindweave/model/kernels.py: ``cudnn``, ``flash``,
    ``efficient`` SDPA tried first; ``default``: PyTorch's own order; ``fa4``: FlashAttention-4;
    ``sage2``: SageAttention 2, 8-bit) or a policy over it (``auto``, ``auto_8bit``);
    ``fuse_projections``: one GEMM for q/k/v (and for
    each cross-attention K/V pair); ``linear_precision``: ``dtype`` (the model's), ``fp8`` or
    ``auto_fp8`` (bindweave.model.fp8); ``compile``: ``torch.compile`` each transformer block (one
    graph, reused by all 40 blocks) with ``compile_backend`` (``aot_eager`` traces the same graph
    without generating code: CPU tests)."""

    attention: str = "auto"
    fuse_projections: bool = False
    compile: bool = False
    linear_precision: str = "dtype"
    compile_backend: str = "inductor"

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention={self.attention!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
        if self.linear_precision not in LINEAR_PRECISIONS:
            raise ValueError(f"linear_precision={self.linear_precision!r}: choose one of {', '.join(LINEAR_PRECISIONS)}")


@dataclass(frozen=True)
class VideoSettings:
    height: int = 720
    width: int = 1280
    num_frames: int = 81
    fps: int = 16

    def __post_init__(self):
        for name in ("height", "width", "num_frames", "fps"):
            if getattr(self, name) < 1:
                raise BindWeaveInputError(f"video.{name}={getattr(self, name)} must be >= 1 (e.g. video.height=720 "
                                          "video.width=1280 video.num_frames=81 video.fps=16)")
        if self.height % 16 or self.width % 16:
            raise BindWeaveInputError(
                f"video.height={self.height} / video.width={self.width}: both must be multiples of 16 "
                "(VAE 8x and patch 2x); e.g. 720x1280, 480x832"
            )
        if (self.num_frames - 1) % 4:
            raise BindWeaveInputError(f"video.num_frames={self.num_frames}: must be 4k+1 (e.g. 81, 49, 17)")

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, 16, (self.num_frames - 1) // 4 + 1, self.height // 8, self.width // 8)


@dataclass(frozen=True)
class ModelSettings:
    """Where the three weight sets are (local folders or HF repo ids) and how to hold them."""

    dit: str | None = None  # the BindWeave DiT: a folder or a HF repo id
    wan: str | None = None  # Wan2.1-I2V-14B-720P-Diffusers: VAE, UMT5-XXL + tokenizer, CLIP + processor
    dit_subfolder: str | None = None
    revision: str | None = None
    dtype: str = "bfloat16"
    device: str = "auto"
    tiny_root: str | None = None  # set: write (once) and use the tiny model set there
    cache_dir: str = ".cache/bindweave"
    vae_tiling: bool = False
    offload_encoders: bool = False  # move T5 + CLIP to the CPU after each sample's conditioning
    # Speed options of the DiT (bindweave/model/speed.py; same function, measured in docs/PERFORMANCE.md).
    # self-attention: auto | auto_8bit | fa4 | sage2 | cudnn | flash | efficient | default (speed.py)
    attention_kernel: str = SpeedOptions.attention
    fuse_projections: bool = SpeedOptions.fuse_projections  # one GEMM for q/k/v (weights held once)
    compile: bool = SpeedOptions.compile  # torch.compile each block (one graph for all 40; ~20 s once per process)
    # dtype | fp8 | auto_fp8: the blocks' linears in FP8 (bindweave/model/fp8.py)
    linear_precision: str = SpeedOptions.linear_precision
    memory: str = "auto"  # auto | resident | offload: the DiT's blocks on the GPU or streamed in (stages/memory.py)
    gpu_memory_gib: float | None = None  # the GPU memory this process may use (null: all; 24: as on a 24 GB card)
    # LoRAs merged into the DiT at load, stacked in order: [{path: x.safetensors, strength: 1.0}] (model/lora.py)
    loras: list[LoraSettings] = field(default_factory=list)

    def __post_init__(self):
        problems = []
        if self.dtype not in MODEL_DTYPES:
            problems.append(f"model.dtype={self.dtype} is not one of {', '.join(MODEL_DTYPES)}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            problems.append(f"model.device={self.device} is not auto, cpu, cuda or cuda:N")
        if self.attention_kernel not in ATTENTION_CHOICES:
            problems.append(f"model.attention_kernel={self.attention_kernel} is not one of {', '.join(ATTENTION_CHOICES)}")
        if self.memory not in MEMORY_MODES:
            problems.append(f"model.memory={self.memory} is not one of {', '.join(MEMORY_MODES)}")
        if self.gpu_memory_gib is not None and not self.gpu_memory_gib > 0:
            problems.append(f"model.gpu_memory_gib={self.gpu_memory_gib} must be > 0 GiB, or null for the whole GPU")
        if self.linear_precision not in LINEAR_PRECISIONS:
            problems.append(f"model.linear_precision={self.linear_precision} is not one of {', '.join(LINEAR_PRECISIONS)}")
        if problems:
            raise BindWeaveInputError("; ".join(problems))

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # here, not at the top: module docstring of bindweave.settings

        return getattr(torch, self.dtype)

    def speed_options(self) -> SpeedOptions:
        return SpeedOptions(self.attention_kernel, self.fuse_projections, self.compile, self.linear_precision)

    def require_weights(self) -> None:
        """The job needs weights: a tiny set, or both the DiT and the Wan folders."""
        if not self.tiny_root and not (self.dit and self.wan):
            raise BindWeaveInputError("model.dit and model.wan must name the weights (folders or HF repo ids): use "
                                      "model=bindweave_14b [model.dit=weights/BindWeave model.wan=weights/"
                                      "Wan2.1-I2V-14B-720P-Diffusers], or model=tiny")

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return torch.device(self.device)
