"""The self-attention kernels, in one registry: a new kernel is one :class:`Kernel` entry here.

Each entry says what the kernel is called in settings (``model.attention_kernel=NAME``), what it is
in words (logs, sidecars), the function that runs it on the hook's ``[B, L, H, D]`` tensors, where
it can run (CUDA only, compute capabilities, the package it needs) and under which sequence-parallel
backends it can be each rank's local kernel. ``auto`` and ``auto_8bit`` are preference lists over
the entries (:data:`AUTO_PREFERENCES`): the first kernel that runs on the device is taken, and each
one passed over is noted with why.

This module imports no torch at import time: the settings schema takes its choices from here, and a
bad command line is refused before the model libraries load (tests/test_imports.py). The plan
(bindweave/app/build.py) resolves a choice once, against :class:`DeviceFacts` probed once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Kernel:
    name: str
    display: str
    function: str  # "module:attribute": (query, key, value) [B, L, H, D] -> [B, L, H, D]
    sdpa_first: str | None = None  # an SDPA kernel: torch's SDPBackend tried first, the others as fallbacks
    cuda_only: bool = False
    capability_majors: tuple[int, ...] = ()  # CUDA compute capability majors it supports (empty: any)
    min_capability: tuple[int, int] = (0, 0)
    package: str | None = None  # the DeviceFacts.packages name it needs (probed once, with its install hint)
    sequence_backends: tuple[str, ...] = ("deepspeed",)  # backends that can run it for each rank's heads
    exact: bool = True  # False: computes a different function within a measured error (docs/PERFORMANCE.md)


KERNELS: dict[str, Kernel] = {kernel.name: kernel for kernel in (
    Kernel("cudnn", "SDPA, cuDNN first", "bindweave.model.attention:sdpa", sdpa_first="CUDNN_ATTENTION",
           sequence_backends=("deepspeed", "xfuser")),
    Kernel("flash", "SDPA, flash first", "bindweave.model.attention:sdpa", sdpa_first="FLASH_ATTENTION"),
    Kernel("efficient", "SDPA, memory-efficient first", "bindweave.model.attention:sdpa",
           sdpa_first="EFFICIENT_ATTENTION", sequence_backends=("deepspeed", "xfuser")),
    Kernel("default", "SDPA, PyTorch's own kernel order", "bindweave.model.attention:sdpa"),
    Kernel("fa4", "FlashAttention-4 (flash-attn-4)", "bindweave.model.speed:fa4_attention", cuda_only=True,
           capability_majors=(9, 10), package="flash_attn_4"),
    Kernel("sage2", "SageAttention 2 (8-bit: INT8 QK, FP8 PV)", "bindweave.model.speed:sage2_attention",
           cuda_only=True, min_capability=(8, 0), package="sageattention", exact=False),
)}
# Policies over the entries: the first that runs on the device (each one passed over is noted).
AUTO_PREFERENCES: dict[str, tuple[str, ...]] = {"auto": ("fa4", "cudnn"), "auto_8bit": ("sage2", "fa4", "cudnn")}
KERNEL_CHOICES = (*KERNELS, *AUTO_PREFERENCES)
SDPA_FALLBACK_ORDER = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
# xfuser's USP() runs its own kernel list; this project passes it cuDNN, or in float32 (which cuDNN
# lacks) the memory-efficient kernel.
XFUSER_LOCAL_KERNEL = {"float32": "efficient"}
XFUSER_DEFAULT_LOCAL_KERNEL = "cudnn"
CROSS_ATTENTION = "SDPA, PyTorch's own kernel order (every rank, whole context)"


@dataclass(frozen=True)
class DeviceFacts:
    """What the plan needs to know about the device it builds for, probed once before any weight is
    read (bindweave/app/build.py ``probe_device``); tests pass their own to plan for a GPU they
    do not have."""

    type: str  # cpu | cuda
    name: str = ""
    capability: tuple[int, int] | None = None
    packages: frozenset[str] = frozenset()  # optional packages that import here (flash_attn_4, sageattention, torchao)
    package_problems: dict = field(default_factory=dict)  # package -> why it does not import, with the fix
    free_gib: float | None = None  # GPU memory this process may take (within model.gpu_memory_gib); None: no GPU
    total_gib: float | None = None
    host_available_gib: float | None = None  # MemAvailable; None: unknown


def kernel_problem(kernel: Kernel, facts: DeviceFacts) -> str | None:
    """Why ``kernel`` cannot run on the device (None: it can)."""
    if kernel.cuda_only and facts.type != "cuda":
        return f"{kernel.display} runs on CUDA GPUs only and the model is on {facts.type}"
    if facts.type == "cuda" and facts.capability is not None:
        major, minor = facts.capability
        if kernel.capability_majors and major not in kernel.capability_majors:
            return (f"{kernel.display} supports compute capability {'/'.join(f'{m}.x' for m in kernel.capability_majors)}"
                    f"; {facts.name or 'this GPU'} has {major}.{minor}")
        if facts.capability < kernel.min_capability:
            return (f"{kernel.display} needs compute capability {kernel.min_capability[0]}.{kernel.min_capability[1]}"
                    f"+; {facts.name or 'this GPU'} has {major}.{minor}")
    if kernel.package is not None and kernel.package not in facts.packages:
        return facts.package_problems.get(kernel.package, f"{kernel.package} is not installed")
    return None


def resolve_kernel(choice: str, facts: DeviceFacts, notes: list[str]) -> str:
    """The registry entry that runs for ``choice``: itself (a RuntimeError naming the fix if it
    cannot run here), or for ``auto`` / ``auto_8bit`` the first preference that runs (each one
    passed over appended to ``notes``)."""
    if choice in KERNELS:
        problem = kernel_problem(KERNELS[choice], facts)
        if problem:
            raise RuntimeError(f"attention={choice}: {problem}; or choose attention=auto")
        return choice
    if choice not in AUTO_PREFERENCES:
        raise ValueError(f"attention={choice!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    for name in AUTO_PREFERENCES[choice]:
        problem = kernel_problem(KERNELS[name], facts)
        if problem is None:
            return name
        notes.append(f"attention={choice}: not {name} ({problem})")
    raise RuntimeError(f"attention={choice}: no kernel of {AUTO_PREFERENCES[choice]} runs here")


def sequence_local_kernel(backend: str, chosen: str, dtype_name: str) -> str:
    """The rank-local kernel a sequence-parallel backend runs: deepspeed's Ulysses runs the chosen
    one; xfuser's USP() its own (see XFUSER_LOCAL_KERNEL)."""
    if backend == "xfuser":
        return XFUSER_LOCAL_KERNEL.get(dtype_name, XFUSER_DEFAULT_LOCAL_KERNEL)
    return chosen


def attention_function(kernel: Kernel) -> Callable:
    """The function that runs ``kernel`` (imported on first use: FA4 and SageAttention are optional)."""
    module, _, attribute = kernel.function.partition(":")
    return getattr(importlib.import_module(module), attribute)
