"""xfuser's ``USP()`` attention (Ulysses x ring on CUDA), and every xDiT singleton it needs.

``USP()`` reads xfuser's layout from process-wide state (its parallel state and runtime state)
deep inside; this module is the only place that sets or touches that state, so the rest of the
project passes explicit objects. xfuser is imported here only, lazily: it cannot even be
imported on a machine without an accelerator.

Padding: with ring=1 the keys after the Ulysses all-to-all are the whole padded sequence, and
``attention_kwargs={"valid_kv_len": n}`` makes USP drop the trailing padded keys exactly. Under
ring attention each ring step sees another rank's chunk and xfuser cannot mask it (its own
joint-attention padding refuses ring > 1 too), so ring > 1 needs a token count that divides
ring x ulysses.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bindweave.errors import BindWeaveInputError
from parallel.runtime import Runtime

# cuDNN attention was the fastest at 90k tokens on an H100 (ARCHITECTURE §5). It has no fp32
# kernel, so fp32 runs (the tiny test models) use PyTorch's memory-efficient one, which also
# returns the log-sum-exp that ring attention needs to merge its partial results.
ATTENTION_KERNEL = "CUDNN"
FP32_ATTENTION_KERNEL = "SDPA_EFFICIENT"


def _start_xfuser(runtime: Runtime, transformer: torch.nn.Module) -> None:
    """Give xfuser the same layout as ``runtime`` (a collective: every rank calls it once)."""
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import (
        get_sequence_parallel_rank,
        init_distributed_environment,
        initialize_model_parallel,
        initialize_runtime_state,
    )

    layout = runtime.layout
    init_distributed_environment(rank=runtime.rank, world_size=runtime.world_size,
                                 local_rank=runtime.local_rank, backend="nccl")
    # xfuser orders ranks tp-sp-pp-cfg-dp (sequence fastest, data slowest), as our device mesh does.
    initialize_model_parallel(data_parallel_degree=layout.data, classifier_free_guidance_degree=layout.cfg,
                              sequence_parallel_degree=layout.sequence, ulysses_degree=layout.ulysses,
                              ring_degree=layout.ring)
    if get_sequence_parallel_rank() != runtime.sequence_rank:
        raise RuntimeError(f"xfuser placed rank {runtime.rank} at sequence rank {get_sequence_parallel_rank()}, "
                           f"the device mesh at {runtime.sequence_rank}: the token chunks would be misordered")
    engine_config, _ = xFuserArgs(
        data_parallel_degree=layout.data, use_cfg_parallel=layout.cfg == 2, ulysses_degree=layout.ulysses,
        ring_degree=layout.ring, attention_backend=ATTENTION_KERNEL,
    ).create_config()
    # The runtime state reads nothing from a pipeline but its transformer's config (the head count);
    # without one xfuser would assume a single-process layout.
    initialize_runtime_state(pipeline=SimpleNamespace(transformer=transformer), engine_config=engine_config)


class XfuserUspAttention:
    """:class:`~parallel.sequence.SequenceAttention` through xfuser's ``USP()`` over the runtime's sequence group."""

    def __init__(self, runtime: Runtime, transformer: torch.nn.Module):
        _start_xfuser(runtime, transformer)
        from xfuser.core.distributed.attention_backend import AttentionBackendType
        from xfuser.model_executor.layers.usp import USP

        self.usp = USP
        self.fp32_kernel = AttentionBackendType[FP32_ATTENTION_KERNEL]
        self.layout = runtime.layout

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 valid_length: int) -> torch.Tensor:
        padded_length = query.shape[1] * self.layout.sequence
        attention_kwargs = None
        if valid_length < padded_length:
            if self.layout.ring > 1:
                raise BindWeaveInputError(
                    f"{valid_length} video tokens do not divide parallel.ring={self.layout.ring} x "
                    f"parallel.ulysses={self.layout.ulysses}, and ring attention cannot mask the padding: use "
                    "ring=1 (move the degree to ulysses or data), or a resolution/frame count whose token count "
                    "divides ring x ulysses")
            attention_kwargs = {"valid_kv_len": valid_length}
        kernel = self.fp32_kernel if query.dtype == torch.float32 else None  # None: ATTENTION_KERNEL
        # USP takes [B, H, L, D].
        out = self.usp(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                       backend=kernel, attention_kwargs=attention_kwargs)
        return out.transpose(1, 2)
