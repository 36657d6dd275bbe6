"""Apply the layout to a loaded model from outside (torchtitan style), and share the samples out."""

from __future__ import annotations

from bindweave.errors import BindWeaveInputError
from parallel.layout import ParallelLayout
from parallel.runtime import Runtime
from parallel.sequence import SequenceParallelHook

# What the single-device kernel choices run (bindweave/model/speed.py), in words for logs and sidecars.
KERNEL_NAMES = {
    "fa4": "FlashAttention-4 (flash-attn-4)",
    "sage2": "SageAttention 2 (8-bit: INT8 QK, FP8 PV)",
    "cudnn": "SDPA, cuDNN first",
    "flash": "SDPA, flash first",
    "efficient": "SDPA, memory-efficient first",
    "default": "SDPA, PyTorch's own kernel order",
}
CROSS_ATTENTION = "SDPA, PyTorch's own kernel order (every rank, whole context)"



def parallelize(transformer, runtime: Runtime) -> None:
    """Route the DiT's token split/gather and self-attention through the sequence group, if it has
    more than one rank. ``transformer`` is anything with ``set_attention_hook`` (the BindWeave DiT).
    CFG parallel needs nothing from the model (see :mod:`parallel.cfg`).
    """
    if runtime.layout.sequence == 1:
        return
    if runtime.layout.backend == "xfuser":
        from parallel.xfuser_backend import XfuserUspAttention

        attention = XfuserUspAttention(runtime, transformer)
    else:
        from parallel.deepspeed_backend import DeepSpeedUlyssesAttention

        # The single-device hook in place (bindweave.model.speed: the chosen kernel) runs each rank's heads.
        attention = DeepSpeedUlyssesAttention(runtime.sequence_group, transformer.attention_hook.self_attention)
    transformer.set_attention_hook(SequenceParallelHook(runtime.sequence_group, attention))


def sequence_local_kernel(backend: str, chosen: str, dtype_name: str) -> str:
    """The rank-local kernel a sequence-parallel backend runs: deepspeed's Ulysses runs the chosen
    one; xfuser's USP() takes only its own kernel list, and this project passes it cuDNN (or the
    memory-efficient SDPA kernel in float32, which cuDNN lacks)."""
    if backend == "xfuser":
        return "efficient" if dtype_name == "float32" else "cudnn"
    return chosen


def refuse_inapplicable_speed_options(attention_kernel: str, layout: ParallelLayout, device_type: str, dtype_name: str,
                                      offload_encoders: bool = False, linear_precision: str = "dtype",
                                      memory: str = "auto") -> None:
    """Speed and memory options the layout cannot honour end the job before loading, saying why
    (never dropped)."""
    problems = []
    if "t5" in layout.fsdp and offload_encoders:
        problems.append("model.offload_encoders=true cannot apply with parallel.fsdp=[t5]: a sharded T5 stays "
                        "spread over the GPUs of its group; choose one (sharding already saves most of T5's memory)")
    if layout.fsdp and memory == "offload":
        problems.append(f"model.memory=offload cannot apply with parallel.fsdp={list(layout.fsdp)}: a sharded model "
                        "is already spread over the GPUs and its shards cannot also stream from the host; use "
                        "FSDP or offload (model.memory=auto keeps an FSDP layout resident)")
    if "dit" in layout.fsdp and linear_precision == "fp8":
        problems.append("model.linear_precision=fp8 cannot apply with parallel.fsdp=[dit]: FP8 weights are not "
                        "sharded by FSDP2 here; FP8 already halves the DiT's memory, so use it instead of FSDP "
                        "(parallel.fsdp=[]), or keep FSDP with model.linear_precision=dtype (auto_fp8 stays in "
                        "the model's dtype under FSDP)")
    if layout.sequence > 1:
        backend = layout.attention_backend(device_type)
        local = sequence_local_kernel(backend, attention_kernel, dtype_name)
        if attention_kernel not in ("auto", "auto_8bit", local):
            problems.append(f"model.attention_kernel={attention_kernel} cannot run under sequence parallel "
                            f"(ring={layout.ring} x ulysses={layout.ulysses}) yet: the {backend} backend runs its own "
                            f"rank-local kernel ({KERNEL_NAMES[local]}); use model.attention_kernel=auto (or {local})")
    if problems:
        raise BindWeaveInputError("; ".join(problems))


def attention_call_sites(single_device_kernel: str, layout: ParallelLayout, device_type: str,
                         dtype_name: str) -> dict[str, str]:
    """The kernel that actually runs at each attention call site of the DiT, for the log and sidecars.

    ``single_device_kernel`` is the resolved choice (``auto`` settled by ``bindweave.model.speed``).
    """
    if layout.sequence == 1:
        self_attention = KERNEL_NAMES[single_device_kernel]
    else:
        backend = layout.attention_backend(device_type)
        local = sequence_local_kernel(backend, single_device_kernel, dtype_name)
        self_attention = (f"{backend} sequence parallel (ring={layout.ring} x ulysses={layout.ulysses}), "
                          f"rank-local {KERNEL_NAMES[local]}")
    return {"self_attention": self_attention, "cross_attention": CROSS_ATTENTION}
