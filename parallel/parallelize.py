"""Apply the layout's sequence sharding to a loaded model from outside (torchtitan style). What runs where
was settled by the build plan (bindweave/app/build.py; the kernels' registry: bindweave/model/kernels.py)."""

from __future__ import annotations

from parallel.runtime import Runtime
from parallel.sequence import SequenceParallelHook


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
