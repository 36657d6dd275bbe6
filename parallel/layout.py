"""The one owner of the stage-3 process layout: data x cfg x ring x ulysses = world size.

One sample runs on one *sequence group* (ring x ulysses ranks that share its tokens); with
cfg=2 the positive and negative passes run on two sequence groups at once; data groups take
different samples. Every check happens here, before any weight is read, and an error names
each degree, the world size and what to change.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, fields

from bindweave.errors import BindWeaveInputError
from bindweave.settings.parallel import ParallelSettings, choice_problems

log = logging.getLogger("bindweave")

# What a sequence-parallel backend needs installed (setup.cfg extras).
BACKEND_PACKAGES = {"xfuser": "pip install -e '.[cuda]' (xfuser, yunchang)", "deepspeed": "pip install -e '.[deepspeed]'"}


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of the process layout and the sequence-parallel attention backend.

    ``backend``: ``xfuser`` (USP; CUDA only; ring and ulysses), ``deepspeed`` (Ulysses only; CUDA
    or CPU/gloo) or ``auto`` (deepspeed, which runs the chosen kernel for each rank's heads; xfuser
    where ring attention is asked for on CUDA). It matters only when ``sequence > 1``.
    """

    data: int = 1
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    backend: str = "auto"
    # FSDP2 parameter sharding: which models, over which ranks ("group": the cfg x sequence ranks of
    # one data group; "sequence": one sequence group; "world": every rank, only with data=1).
    fsdp: tuple[str, ...] = ()
    fsdp_scope: str = "group"
    # "split": the cfg x sequence ranks of a sample each decode a band of rows (parallel/decode.py).
    decode: str = "single"

    def __post_init__(self):
        object.__setattr__(self, "fsdp", tuple(self.fsdp))

    @property
    def sequence(self) -> int:
        """Ranks that share one sample's tokens."""
        return self.ring * self.ulysses

    @property
    def world_size(self) -> int:
        return self.data * self.cfg * self.sequence

    def attention_backend(self, device_type: str) -> str:
        """The concrete backend. ``auto``: deepspeed's Ulysses, whose rank-local attention is the
        chosen kernel (FA4, sage2, cuDNN: xfuser's ``USP()`` takes only its own kernel list, cuDNN
        here, ~18 % slower per forward than FA4 on an H200); xfuser only for ring attention on CUDA,
        which deepspeed lacks. Both move the same bytes (one all-to-all each for q, k, v and the output)."""
        if self.backend == "auto":
            return "xfuser" if device_type == "cuda" and self.ring > 1 else "deepspeed"
        return self.backend

    def describe(self) -> str:
        sharding = f", fsdp={'+'.join(self.fsdp)} over {self.fsdp_scope}" if self.fsdp else ""
        return (f"data={self.data} x cfg={self.cfg} x ring={self.ring} x ulysses={self.ulysses} "
                f"(= {self.world_size} ranks), backend={self.backend}{sharding}")

    def validate(self, world_size: int, num_heads: int, device_type: str) -> None:
        """Raise :class:`BindWeaveInputError` listing every problem with this layout."""
        problems = []
        for name in ("data", "cfg", "ring", "ulysses"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"parallel.{name}={value!r} must be a whole number >= 1")
        if problems:  # the checks below multiply the degrees
            raise self._error(world_size, num_heads, problems)
        problems += choice_problems(self.backend, self.fsdp, self.fsdp_scope, self.decode)
        if self.cfg not in (1, 2):
            problems.append(f"parallel.cfg={self.cfg}: CFG has two passes, so use cfg=1 or cfg=2")
        if num_heads % self.ulysses:
            fitting = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            problems.append(f"parallel.ulysses={self.ulysses} does not divide the model's {num_heads} attention "
                            f"heads (Ulysses gives each rank whole heads): use ulysses in {fitting}")
        if self.world_size != world_size:
            problems.append(
                f"the degrees multiply to {self.world_size} but {world_size} process(es) were started: change "
                f"them so that data*cfg*ring*ulysses = {world_size} (or use parallel=auto), or start "
                f"{self.world_size} processes (torchrun --nproc_per_node={self.world_size})")
        backend = self.attention_backend(device_type)
        if self.sequence > 1 and backend == "xfuser" and device_type != "cuda":
            problems.append(f"parallel.backend=xfuser needs CUDA (this run is on {device_type}): "
                            "use parallel.backend=deepspeed or auto")
        if self.sequence > 1 and backend in BACKEND_PACKAGES and importlib.util.find_spec(backend) is None:
            problems.append(f"sequence parallel uses {backend}, which is not installed: {BACKEND_PACKAGES[backend]}")
        if self.fsdp and self.fsdp_scope == "world" and self.data > 1:
            problems.append(f"parallel.fsdp_scope=world with data={self.data}: data groups run different numbers of "
                            "forwards, so world-wide parameter gathers would wait forever; use fsdp_scope=group")
        if self.ring > 1 and backend != "xfuser":
            problems.append(f"parallel.ring={self.ring} needs the xfuser backend on CUDA (deepspeed has Ulysses "
                            f"only; this run uses {backend}): move the degree to ulysses, or use "
                            "parallel.backend=xfuser on GPUs")
        if problems:
            raise self._error(world_size, num_heads, problems)

    def _error(self, world_size: int, num_heads: int, problems: list[str]) -> BindWeaveInputError:
        listed = "\n  - ".join(problems)
        return BindWeaveInputError(
            f"invalid parallel layout {self.describe()} for world size {world_size} and {num_heads} attention "
            f"heads:\n  - {listed}")

    @classmethod
    def auto(cls, world_size: int, num_heads: int, backend: str = "auto", fsdp: tuple[str, ...] = (),
             fsdp_scope: str = "group", decode: str = "single", cfg_passes: int = 2) -> ParallelLayout:
        """A valid layout for any world size, fastest for one sample first.

        - cfg=2 whenever the world size is even and the job has two CFG passes (``cfg_passes`` 1:
          no guidance, no negative pass to put on a group of its own): the two passes then cost one exchange of the
          prediction per step, far less than Ulysses' four all-to-alls per block;
        - ulysses = the largest divisor of the rest that also divides the head count;
        - data takes what is left (whole samples per group, no communication at all);
        - ring stays 1: padded keys cannot be masked under xfuser's ring attention.
        E.g. 8 ranks, 40 heads: cfg=2 x ulysses=4; 2 ranks: cfg=2; 6 ranks: cfg=2 x data=3.
        The measurements behind it are in :func:`auto_reason` (logged with the choice).
        """
        cfg = 2 if world_size % 2 == 0 and cfg_passes == 2 else 1
        rest = world_size // cfg
        ulysses = max(d for d in range(1, rest + 1) if rest % d == 0 and num_heads % d == 0)
        return cls(data=rest // ulysses, cfg=cfg, ulysses=ulysses, backend=backend, fsdp=fsdp, fsdp_scope=fsdp_scope,
                   decode=decode)


def auto_reason(layout: ParallelLayout) -> str:
    """Why ``ParallelLayout.auto`` chose ``layout``, with the numbers (docs/PERFORMANCE.md, one
    NVIDIA H200, 2026-12-01: each rank's compute of one 720P forward at ulysses 1/2/4/8 measured
    16.95/8.57/4.30/2.17 s, i.e. it divides almost exactly; the bytes come from the code)."""
    parts = []
    if layout.cfg == 2:
        parts.append("cfg=2: the two CFG passes run on two groups at once and exchange one prediction per step "
                     "(~10 MB at 720P), against Ulysses' four all-to-alls per block (~28 GB per forward at ulysses=4)")
    if layout.ulysses > 1:
        parts.append(f"ulysses={layout.ulysses}: the widest split of the rest that divides the heads (each rank's "
                     "compute falls as 1/N: 1.98x / 3.95x / 7.80x at 2 / 4 / 8)")
    if layout.data > 1:
        parts.append(f"data={layout.data}: whole samples per group for what is left, with no communication")
    if not parts:
        parts.append("one process")
    return "; ".join(parts) + " (projected 50-step video on 8 GPUs: cfg2 x ulysses4 219 s, ulysses8 223 s)"


def layout_from_config(parallel: ParallelSettings, world_size: int, num_heads: int, device_type: str,
                       cfg_passes: int = 2) -> ParallelLayout:
    """The validated layout of the ``parallel`` settings: ``auto: true`` picks one for the world size
    and the job's CFG passes per step (``cfg_passes``)."""
    degrees = {f.name: getattr(parallel, f.name) for f in fields(ParallelLayout) if hasattr(parallel, f.name)}
    if "fsdp" in degrees:
        degrees["fsdp"] = tuple(degrees["fsdp"] or ())
    if getattr(parallel, "auto", False):
        chosen = {name: value for name, value in degrees.items()
                  if name in ("data", "cfg", "ring", "ulysses") and value != 1}
        if chosen:
            settings = " ".join(f"parallel.{name}={value}" for name, value in chosen.items())
            raise BindWeaveInputError(
                f"parallel=auto chooses the degrees itself, but {settings} was given: start from an explicit "
                f"layout instead, e.g. parallel=single {settings}")
        layout = ParallelLayout.auto(world_size, num_heads, backend=degrees.get("backend", "auto"),
                                     fsdp=tuple(degrees.get("fsdp", ())), fsdp_scope=degrees.get("fsdp_scope", "group"),
                                     decode=degrees.get("decode", "single"), cfg_passes=cfg_passes)
        if world_size > 1:
            log.info("parallel=auto on %d processes: %s. Why: %s", world_size, layout.describe(), auto_reason(layout))
    else:
        layout = ParallelLayout(**degrees)
    layout.validate(world_size, num_heads, device_type)
    return layout
