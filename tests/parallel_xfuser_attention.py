"""xfuser's USP on ONE GPU (sequence degree 1) against plain attention, with and without padded keys.

    torchrun --standalone --nproc_per_node=1 tests/parallel_xfuser_attention.py

Exits non-zero (an assertion names the case) on a mismatch; prints each case's largest error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.model.attention import sdpa  # noqa: E402
from bindweave.model.transformer import TINY_CONFIG, BindWeaveTransformer  # noqa: E402
from parallel.distributed import detect_processes, rank_device, stop_process_group  # noqa: E402
from parallel.layout import ParallelLayout  # noqa: E402
from parallel.runtime import Runtime  # noqa: E402
from parallel.xfuser_backend import XfuserUspAttention  # noqa: E402

# [B, L, H, D] like one 14B block at a small token count; bf16 goes through cuDNN, fp32 through
# the memory-efficient kernel.
SHAPE = (1, 300, 40, 128)
TOLERANCE = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def main() -> None:
    processes = detect_processes()
    device = rank_device(processes, "cuda")
    torch.cuda.set_device(device)
    runtime = Runtime.build(ParallelLayout(backend="xfuser"), processes, device)
    try:
        attention = XfuserUspAttention(runtime, BindWeaveTransformer(**TINY_CONFIG))  # xfuser reads its config
        generator = torch.Generator().manual_seed(0)
        for dtype, tolerance in TOLERANCE.items():
            query, key, value = (torch.randn(SHAPE, generator=generator).to(device, dtype) for _ in range(3))
            for valid_length in (SHAPE[1], 257):
                out = attention(query, key, value, valid_length=valid_length)
                expected = sdpa(query, key[:, :valid_length], value[:, :valid_length])
                error = (out.float() - expected.float()).abs().max().item()
                print(f"{dtype} valid {valid_length}/{SHAPE[1]}: max error {error:.2e}", flush=True)
                torch.testing.assert_close(out, expected, **tolerance, msg=lambda m: f"{dtype} {valid_length}: {m}")
    finally:
        stop_process_group()


if __name__ == "__main__":
    main()
