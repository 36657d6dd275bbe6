"""Parallel VAE decode (parallel/decode.py): every rank of a sample's group decodes a band of rows
(counted) and all get the same video, within the documented bound of the one-rank decode; the
one-rank decode stays the exact default. Each case is its own torchrun (gloo, CPU)."""

import numpy as np
import pytest
import torch

from parallel.decode import row_bands
from parallel_launch import run_script

DECODE = "tests/parallel_decode.py"
ROWS = 50  # tests/parallel_decode.py's latent rows
# The bound, in uint8 levels (of 255), of a split decode against the one-rank decode on the tiny VAE
# (measured 2026-12-01 with the 16-row halo: 2 ranks 0.73 (max 32), 4 ranks 1.24 (max 39) on average).
MAX_MEAN_ABS_LEVELS = 2.0


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-rank")
    run_script(DECODE, out, tiny_models.wan, processes=None, timeout=180)
    return np.load(out / "frames.rank0.npy")


def test_row_bands_cover_every_row_once():
    assert row_bands(13, 4) == [(0, 4), (4, 7), (7, 10), (10, 13)]
    assert row_bands(ROWS, 4) == [(0, 13), (13, 26), (26, 38), (38, 50)]
    assert row_bands(90, 8)[0] == (0, 12) and row_bands(90, 8)[-1] == (79, 90)
    with pytest.raises(ValueError, match="3 latent rows cannot be split over 4 ranks"):
        row_bands(3, 4)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("processes, degrees", [(2, ["ulysses=2"]), (4, ["cfg=2", "ulysses=2"])],
                         ids=["ulysses2", "cfg2_ulysses2"])
def test_every_rank_decodes_a_band_and_the_video_is_within_the_bound(reference, tiny_models, tmp_path, processes,
                                                                     degrees):
    run_script(DECODE, tmp_path, tiny_models.wan, *degrees, processes=processes, timeout=240)
    frames = [np.load(tmp_path / f"frames.rank{rank}.npy") for rank in range(processes)]
    rows = [int((tmp_path / f"rows.rank{rank}.txt").read_text()) for rank in range(processes)]
    assert rows == [stop - start for start, stop in row_bands(ROWS, processes)]  # each rank its own band
    assert all(np.array_equal(frames[0], other) for other in frames[1:])  # gathered: the same video everywhere
    assert frames[0].shape == reference.shape
    difference = np.abs(frames[0].astype(np.int16) - reference.astype(np.int16))
    print(f"{processes} ranks: mean |split - one rank| = {difference.mean():.3f} levels, max {difference.max()}")
    assert difference.mean() <= MAX_MEAN_ABS_LEVELS


def test_the_one_rank_decode_is_diffusers_decode_and_a_band_is_its_rows_with_a_full_halo(tiny_models):
    """The exact path is diffusers' own decode of the de-normalised latents; a band whose halo reaches
    both edges decodes the whole video and keeps its rows, so it equals those rows exactly."""
    from bindweave.encoders.conditioning import WanVae

    vae = WanVae.from_folder(tiny_models.wan, dtype=torch.float32, device="cpu")
    latents = torch.randn(1, 16, 2, 6, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        video = vae.model.decode(latents * vae.latents_std + vae.latents_mean).sample[0].clamp(-1, 1)
    expected = ((video + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    whole = vae.decode_to_frames(latents)
    assert np.array_equal(whole, expected)
    assert np.array_equal(vae.decode_rows(latents, 2, 4, halo=6), whole[:, 16:32])
