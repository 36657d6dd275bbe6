"""The ``parallel`` settings (conf/parallel/ presets override them): the process layout's degrees,
the sequence-parallel backend, FSDP, the decode and the collective timeout. parallel/layout.py turns
them into the one ``ParallelLayout`` of a launch (its checks against the world size, the heads and
the device live there)."""

from __future__ import annotations

from dataclasses import dataclass

from bindweave.errors import BindWeaveInputError

BACKENDS = ("auto", "xfuser", "deepspeed")
FSDP_MODELS = ("dit", "t5")
FSDP_SCOPES = ("group", "sequence", "world")
DECODES = ("single", "split")  # the VAE decode: every rank whole (exact) | rows split over the sample's ranks


def choice_problems(backend: str, fsdp: tuple[str, ...], fsdp_scope: str, decode: str) -> list[str]:
    """What is wrong with the named choices (each must be one of its list), one line per setting."""
    problems = []
    if backend not in BACKENDS:
        problems.append(f"parallel.backend={backend} is not one of {', '.join(BACKENDS)}")
    unknown = [name for name in fsdp if name not in FSDP_MODELS]
    if unknown:
        problems.append(f"parallel.fsdp={list(fsdp)}: {unknown} cannot be sharded; use a subset of {list(FSDP_MODELS)}")
    if fsdp_scope not in FSDP_SCOPES:
        problems.append(f"parallel.fsdp_scope={fsdp_scope} is not one of {', '.join(FSDP_SCOPES)}")
    if decode not in DECODES:
        problems.append(f"parallel.decode={decode} is not one of {', '.join(DECODES)}")
    return problems


@dataclass(frozen=True)
class ParallelSettings:
    """The ``parallel`` settings (conf/parallel presets override these): a layout's degrees, or
    ``auto`` to choose them for the number of processes started, and the collective timeout."""

    auto: bool = False  # true: ParallelLayout.auto chooses data/cfg/ring/ulysses, the degrees below must stay 1
    data: int = 1  # groups that take different samples (sorted ids, strided)
    cfg: int = 1  # 2: positive and negative passes on two groups at once
    ring: int = 1  # ring attention degree (xfuser backend on CUDA only)
    ulysses: int = 1  # Ulysses degree: must divide the 40 attention heads (1, 2, 4, 5, 8, ...)
    backend: str = "auto"  # sequence-parallel attention: auto (deepspeed; xfuser for ring > 1 on CUDA) | xfuser | deepspeed
    fsdp: tuple[str, ...] = ()  # FSDP2 parameter sharding of [dit] and/or [t5] (per block, bf16, sharded loading)
    fsdp_scope: str = "group"  # group (cfg x sequence ranks of a data group) | sequence | world (data=1 only)
    decode: str = "single"  # single: every rank decodes the whole video (exact) | split: rows over the sample's ranks
    timeout_s: float = 600  # a collective waiting this long fails, so a dead rank ends the job instead of hanging it

    def __post_init__(self):
        object.__setattr__(self, "fsdp", tuple(self.fsdp))
        problems = choice_problems(self.backend, self.fsdp, self.fsdp_scope, self.decode)
        if self.timeout_s <= 0:
            problems.append(f"parallel.timeout_s={self.timeout_s} must be > 0 seconds")
        if problems:
            raise BindWeaveInputError("; ".join(problems))
