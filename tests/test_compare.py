"""Comparing two runs of the same jobs (bindweave/quality/compare.py, launch/compare.py) on tiny
real MP4s, sidecars and latents."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bindweave.errors import BindWeaveInputError
from bindweave.io.outputs import write_json, write_mp4
from bindweave.quality.compare import LABEL_BAND_PX, compare_runs, mean_ssim, psnr, write_comparison
from bindweave.quality.motion import FLOW_SIDE, motion_amplitude

REPO = Path(__file__).resolve().parents[1]
FRAMES, HEIGHT, WIDTH = 5, 32, 48
TILE_WIDTH = 24  # tiles of 24 x 16 pixels (the videos' 3:2 kept)


def smooth_frames(count: int = FRAMES) -> np.ndarray:
    """A moving colour ramp: smooth enough that H.264 keeps it, so added noise shows in PSNR."""
    y, x = np.mgrid[:HEIGHT, :WIDTH]
    frames = [np.stack([x * 5 + 8 * t, y * 7, (x + y) * 3], axis=-1) % 256 for t in range(count)]
    return np.stack(frames).astype(np.uint8)


def moving_square(speed: int, count: int = 9, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A bright textured 12-pixel square crossing a dark frame at `speed` pixels per frame (0: a still
    video). Contrast at every scale: the flow's coarse levels must see the square too."""
    texture = np.kron(np.random.default_rng(1).integers(128, 256, (6, 6, 3)), np.ones((2, 2, 1))).astype(np.uint8)
    frames = np.full((count, height, width, 3), 20, np.uint8)
    for index, frame in enumerate(frames):
        left = 2 + speed * index
        frame[height // 4:height // 4 + 12, left:left + 12] = texture
    return frames


def noisy(frames: np.ndarray, sigma: float) -> np.ndarray:
    noise = np.random.default_rng(0).normal(0, sigma, frames.shape)
    return np.clip(frames + noise, 0, 255).astype(np.uint8)


def reference_latents() -> torch.Tensor:
    return torch.randn(1, 16, 2, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))


def write_sample(folder: Path, sample_id: str, frames: np.ndarray, latents: torch.Tensor | None = None,
                 denoise_s: float = 10.0, speed: str = "exact") -> None:
    """One finished sample as stage 3 leaves it: the MP4, the latents, the sidecar last."""
    write_mp4(folder / f"{sample_id}.mp4", frames)
    if latents is not None:
        save_file({"latents": latents}, folder / f"{sample_id}.latents.safetensors")
    write_json(folder / f"{sample_id}.json", {
        "sample_id": sample_id, "seed": 0, "num_steps": 2,
        "resolution": {"height": HEIGHT, "width": WIDTH, "num_frames": len(frames), "fps": 16},
        "timings": {"denoise_s": denoise_s}, "speed": {"mode": speed}})


def test_psnr_and_ssim_of_known_frames():
    zeros = np.zeros((2, 8, 8, 3), np.uint8)
    assert psnr(zeros, zeros) == math.inf
    assert psnr(zeros, zeros + 10) == pytest.approx(10 * math.log10(255**2 / 100))
    frames = smooth_frames()
    assert mean_ssim(frames, frames, frame_stride=2) == pytest.approx(1.0)
    assert mean_ssim(frames, noisy(frames, 20)) < 1.0


def test_identical_runs(tmp_path):
    frames, latents = smooth_frames(), reference_latents()
    for run in ("exact", "again"):
        write_sample(tmp_path / run, "a", frames, latents)
    comparison = compare_runs(tmp_path / "exact", tmp_path / "again")
    (sample,) = comparison.report["samples"]
    assert sample["error"] is None and sample["psnr_db"] == math.inf
    assert sample["ssim"] == pytest.approx(1.0) and sample["latent_rel_error"] == 0.0
    summary = comparison.report["summary"]
    assert summary["identical_videos"] == 1 and summary["mean_psnr_db"] == math.inf
    write_comparison(comparison, tmp_path / "report")
    written = json.loads((tmp_path / "report" / "compare.json").read_text())
    assert written["samples"][0]["psnr_db"] == "inf" and written["summary"]["mean_psnr_db"] == "inf"


def test_more_noise_lower_psnr_and_the_known_latent_error(tmp_path):
    frames, latents = smooth_frames(), reference_latents()
    levels = {"a": (4, 0.01), "b": (16, 0.1), "c": (48, 0.5)}  # sample -> (pixel noise sigma, latent rel. error)
    for sample_id, (sigma, latent_error) in levels.items():
        write_sample(tmp_path / "exact", sample_id, frames, latents, denoise_s=10.0)
        write_sample(tmp_path / "fast", sample_id, noisy(frames, sigma), latents * (1 + latent_error),
                     denoise_s=4.0, speed="fastest")
    report = compare_runs(tmp_path / "exact", tmp_path / "fast").report
    samples = report["samples"]
    psnrs = [sample["psnr_db"] for sample in samples]
    assert all(math.isfinite(value) for value in psnrs) and psnrs == sorted(psnrs, reverse=True), psnrs
    assert len(set(psnrs)) == 3
    assert all(sample["ssim"] < 1.0 for sample in samples)
    for sample, (_, latent_error) in zip(samples, levels.values()):
        assert sample["latent_rel_error"] == pytest.approx(latent_error, rel=1e-5)
        assert sample["speedup"] == pytest.approx(2.5)
        assert sample["reference_speed"] == {"mode": "exact"} and sample["candidate_speed"] == {"mode": "fastest"}
    summary = report["summary"]
    assert summary["mean_psnr_db"] == pytest.approx(np.mean(psnrs))
    assert summary["max_latent_rel_error"] == pytest.approx(0.5, rel=1e-5)
    assert summary["denoise_speedup"] == pytest.approx(2.5)


def test_latents_missing_on_one_side_are_null_with_the_reason(tmp_path):
    write_sample(tmp_path / "exact", "a", smooth_frames(), reference_latents())
    write_sample(tmp_path / "fast", "a", smooth_frames())
    (sample,) = compare_runs(tmp_path / "exact", tmp_path / "fast").report["samples"]
    assert sample["error"] is None and sample["latent_rel_error"] is None
    assert str(tmp_path / "fast" / "a.latents.safetensors") in sample["latent_note"]


def test_no_sample_in_common_names_both_folders(tmp_path):
    write_sample(tmp_path / "exact", "a", smooth_frames())
    write_sample(tmp_path / "fast", "b", smooth_frames())
    with pytest.raises(BindWeaveInputError, match="No sample is finished in both") as info:
        compare_runs(tmp_path / "exact", tmp_path / "fast")
    assert str(tmp_path / "exact") in str(info.value) and str(tmp_path / "fast") in str(info.value)


def test_motion_amplitude_is_zero_when_still_and_grows_with_the_speed():
    still, slow, fast = (motion_amplitude(moving_square(speed, height=48, width=96)) for speed in (0, 2, 4))
    assert still == 0.0 and slow > 0.1
    assert 1.8 < fast / slow < 2.2, (slow, fast)  # twice the speed, twice the amplitude
    assert motion_amplitude(moving_square(2, count=1)) is None  # no pair of frames
    # In the video's pixels: 2x the size, shrunk back to FLOW_SIDE for the flow, reads 2x.
    video = moving_square(2, height=48, width=FLOW_SIDE)
    doubled = np.repeat(np.repeat(video, 2, axis=1), 2, axis=2)
    assert motion_amplitude(doubled) / motion_amplitude(video) == pytest.approx(2, rel=0.1)


def test_a_candidate_that_kills_the_motion_shows_it_for_both_runs(tmp_path):
    write_sample(tmp_path / "exact", "a", moving_square(4))
    write_sample(tmp_path / "draft", "a", moving_square(0), speed="draft")
    comparison = compare_runs(tmp_path / "exact", tmp_path / "draft")
    (sample,) = comparison.report["samples"]
    assert sample["reference_motion"] > 0.1 and sample["candidate_motion"] < 0.01 and sample["motion_ratio"] < 0.1
    summary = comparison.report["summary"]
    assert (summary["mean_reference_motion"], summary["mean_candidate_motion"], summary["motion_ratio"]) == (
        sample["reference_motion"], sample["candidate_motion"], sample["motion_ratio"])
    row = next(line for line in comparison.markdown.splitlines() if line.startswith("| a |"))
    assert f"| {sample['reference_motion']:.3f} | {sample['candidate_motion']:.3f} |" in row
    assert "motion ref (px/frame) | motion cand (px/frame)" in comparison.markdown
    assert f"candidate / reference {sample['motion_ratio']:.2f}x" in comparison.markdown


# Through the entry point: its three outcomes run as concurrent subprocesses (each start imports
# torch and diffusers, ~5 s).

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict:
    """The folders' root ("root") and the finished process of a good run ("good"), a missing
    reference folder ("missing") and a frame-count mismatch ("mismatch")."""
    root = tmp_path_factory.mktemp("compare-cli")
    frames, latents = smooth_frames(), reference_latents()
    for sample_id in ("a", "b"):
        write_sample(root / "exact", sample_id, frames, latents)
        write_sample(root / "fast", sample_id, noisy(frames, 8), latents * 1.1, denoise_s=5.0)
    write_sample(root / "exact", "only_ref", frames)
    write_sample(root / "fast", "only_fast", frames)
    write_sample(root / "short", "a", frames[:4])
    write_sample(root / "short", "b", frames)
    commands = {
        "good": (root / "exact", root / "fast"),
        "missing": (root / "nowhere", root / "fast", "--out", root / "missing-report"),
        "mismatch": (root / "exact", root / "short"),
    }
    started = {name: subprocess.Popen([sys.executable, str(REPO / "launch" / "compare.py"), *map(str, args),
                                       "--tile-width", str(TILE_WIDTH)],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in commands.items()}
    results = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return {"root": root, **results}


def test_cli_writes_the_report(cli_runs):
    result, report = cli_runs["good"], cli_runs["root"] / "fast" / "compare"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| a |" in result.stdout and "| b |" in result.stdout
    assert sorted(path.name for path in report.iterdir()) == ["compare.json", "compare.md", "contact_sheet.png"]
    summary = json.loads((report / "compare.json").read_text())["summary"]
    assert summary["compared"] == 2 and summary["failed"] == 0
    assert summary["only_in_reference"] == ["only_ref"] and summary["only_in_candidate"] == ["only_fast"]
    assert summary["max_latent_rel_error"] == pytest.approx(0.1, rel=1e-5)
    assert summary["mean_reference_motion"] > 0 and summary["mean_candidate_motion"] > 0
    markdown = (report / "compare.md").read_text()
    assert "only in the reference: only_ref" in markdown and "only in the candidate: only_fast" in markdown
    tile_height = HEIGHT * TILE_WIDTH // WIDTH
    with Image.open(report / "contact_sheet.png") as sheet:
        assert sheet.size == (6 * TILE_WIDTH, 2 * (LABEL_BAND_PX + tile_height))


def test_cli_missing_folder_exits_2_and_writes_nothing(cli_runs):
    result, root = cli_runs["missing"], cli_runs["root"]
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert str(root / "nowhere") in line and "Traceback" not in result.stderr
    assert not (root / "missing-report").exists()


def test_cli_frame_count_mismatch_exits_1_and_compares_the_rest(cli_runs):
    result, report = cli_runs["mismatch"], cli_runs["root"] / "short" / "compare"
    assert result.returncode == 1, result.stderr[-3000:]
    samples = {sample["sample_id"]: sample for sample in json.loads((report / "compare.json").read_text())["samples"]}
    assert "4 frames" in samples["a"]["error"] and samples["a"]["psnr_db"] is None
    assert samples["b"]["error"] is None and samples["b"]["psnr_db"] == "inf"
    with Image.open(report / "contact_sheet.png") as sheet:  # the mismatched sample keeps its row
        assert sheet.height == 2 * (LABEL_BAND_PX + HEIGHT * TILE_WIDTH // WIDTH)
