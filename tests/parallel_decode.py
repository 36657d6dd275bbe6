"""Decode seeded latents with the tiny Wan VAE under a layout and save every rank's frames.

    torchrun --standalone --nproc_per_node=N tests/parallel_decode.py OUT_DIR WAN_FOLDER cfg=2 ulysses=2 [cuda]

Without torchrun it is the one-rank decode. ``parallel.decode=split`` in the layout (N > 1): each
rank of the sample's group decodes a band of rows; every rank writes ``OUT_DIR/frames.rank{R}.npy``
and the latent rows it decoded to ``OUT_DIR/rows.rank{R}.txt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.encoders.conditioning import WanVae  # noqa: E402
from parallel.distributed import detect_processes, rank_device, start_process_group, stop_process_group  # noqa: E402
from parallel.layout import ParallelLayout  # noqa: E402
from parallel.runtime import Runtime  # noqa: E402

LATENTS = (1, 16, 3, 50, 10)  # 50 latent rows: split unevenly over 4 ranks, each band cut off by the others


def main() -> None:
    out_dir, wan_folder, *degrees = sys.argv[1:]
    device_type = degrees.pop() if degrees and degrees[-1] == "cuda" else "cpu"  # cuda: GPU LOCAL_RANK, NCCL
    processes = detect_processes()
    layout = ParallelLayout(**{name: int(value) for name, value in (d.split("=") for d in degrees)}, decode="split")
    layout.validate(processes.world_size, 4, device_type)
    start_process_group(processes, device_type, timeout_s=120)
    try:
        device = rank_device(processes, device_type)
        runtime = Runtime.build(layout, processes, device)
        vae = WanVae.from_folder(wan_folder, dtype=torch.float32, device=device)
        decoded_rows = []
        decode_rows = vae.decode_rows

        def counted(latents, start, stop, halo):
            decoded_rows.append(stop - start)
            return decode_rows(latents, start, stop, halo)

        vae.decode_rows = counted
        latents = torch.randn(LATENTS, generator=torch.Generator().manual_seed(0)).to(device)
        frames = runtime.decode(vae, latents)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / f"frames.rank{processes.rank}.npy", frames)
        (out / f"rows.rank{processes.rank}.txt").write_text(str(sum(decoded_rows)))
    finally:
        stop_process_group()


if __name__ == "__main__":
    main()
