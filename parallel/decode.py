"""Parallel VAE decode (``parallel.decode=split``): the ranks that share a sample (its cfg x
sequence group) each decode a band of latent rows, with a halo of context rows on each side that
is decoded and then cropped, and the bands are gathered so every rank holds the whole video.

The Wan VAE's convolutions see a few latent rows around each pixel, which the halo covers; its
mid-block attention sees the whole frame, which a band cannot: so the result differs slightly from
the one-rank decode (``parallel.decode=single``, exact). tests/test_parallel_decode.py measures
the difference and bounds it; docs/PERFORMANCE.md has the numbers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

HALO_ROWS = 16  # latent rows of context on each side of a band (128 pixel rows)


def row_bands(rows: int, parts: int) -> list[tuple[int, int]]:
    """``rows`` split into ``parts`` contiguous bands, the first ``rows % parts`` one row taller."""
    if parts > rows:
        raise ValueError(f"{rows} latent rows cannot be split over {parts} ranks")
    base, extra = divmod(rows, parts)
    bands, start = [], 0
    for index in range(parts):
        stop = start + base + (index < extra)
        bands.append((start, stop))
        start = stop
    return bands


def split_decode(vae, latents: torch.Tensor, group: dist.ProcessGroup, device: torch.device,
                 halo: int = HALO_ROWS) -> np.ndarray:
    """Every rank of ``group`` decodes its band; every rank returns the whole video's frames."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    bands = row_bands(latents.shape[-2], size)
    start, stop = bands[rank]
    band = torch.from_numpy(vae.decode_rows(latents, start, stop, halo))  # [F, (stop-start)*8, W, 3] uint8
    scale = vae.spatial_compression
    tallest = max(b - a for a, b in bands) * scale
    # all_gather needs equal shapes: each band padded to the tallest, the padding dropped after.
    padded = torch.zeros(band.shape[0], tallest, *band.shape[2:], dtype=torch.uint8, device=device)
    padded[:, :band.shape[1]] = band.to(device)
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([part[:, :(b - a) * scale] for part, (a, b) in zip(gathered, bands)], dim=1).cpu().numpy()
