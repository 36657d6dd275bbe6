"""Compare two runs of the same stage-3 jobs: a reference (e.g. speed=exact) and a candidate (speed=fastest).

    python launch/compare.py outputs/exact outputs/fastest     # -> outputs/fastest/compare/

    comparison = compare_runs("outputs/exact", "outputs/fastest", frame_stride=4)
    write_comparison(comparison, "outputs/fastest/compare")

A sample is compared when both folders hold it finished (`ID.mp4` with its `ID.json` sidecar);
samples finished in one folder only are listed. Per sample, over the decoded uint8 RGB frames:
PSNR in dB over all frames (data range 255), the mean SSIM of every `frame_stride`-th frame
(scikit-image, data range 255) and, when both runs wrote `ID.latents.safetensors`, the relative
error of the final latents ||reference - candidate|| / ||reference|| in float64 (else null, with
the reason in `latent_note`), and each video's motion amplitude (`reference_motion`,
`candidate_motion`: mean optical-flow displacement in pixels per frame, bindweave/quality/motion.py;
`motion_ratio` candidate / reference, below 1 when the candidate moves less: a draft that "kills
the motion" shows here while its PSNR may still look fine) and, with a scorer given, each video's
aesthetic score (`reference_aesthetic`, `candidate_aesthetic`: OpenS2V-Eval's, bindweave/quality/aesthetic.py;
else null). Each sidecar's `speed` record is copied; the speed-up is the reference's `timings.denoise_s` over the candidate's.

Identical decoded videos have an infinite PSNR: compare.json writes it as the string "inf" (JSON
has no infinity). The summary's mean PSNR is over the samples whose videos differ
(`identical_videos` counts the others), "inf" when all are identical. The summary's motion is the
mean amplitude of each run over the compared samples, and their ratio; likewise the mean aesthetic
scores.

A sample whose videos differ in frame count or size, or whose files cannot be read, gets an
`error` and no PSNR, SSIM or latent error, and is left out of the summary; the others are still
compared. The outputs: compare.json (`summary` and `samples`), compare.md (the same as a
markdown table) and contact_sheet.png: one row per sample whose two videos could be read, six
tiles `tile_width` pixels wide (first, middle and last frame of the reference, then of the
candidate), each under a label band of LABEL_BAND_PX pixels; a row is as high as its highest tile.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError, safe_open
from skimage.metrics import structural_similarity

from bindweave.errors import BindWeaveInputError
from bindweave.io.outputs import atomic_write, latents_path, video_done, write_json
from bindweave.quality.motion import motion_amplitude

LABEL_BAND_PX = 14  # PIL's default font is 12 px high
JSON_NAME, MARKDOWN_NAME, SHEET_NAME = "compare.json", "compare.md", "contact_sheet.png"


@dataclass
class Comparison:
    """What `compare_runs` found: compare.json's content, compare.md's text and the contact sheet
    (None when no sample's two videos could be read)."""

    report: dict
    markdown: str
    sheet: Image.Image | None


def compare_runs(reference_dir: str | os.PathLike, candidate_dir: str | os.PathLike, frame_stride: int = 1,
                 tile_width: int = 256, aesthetic=None) -> Comparison:
    """Compare every sample finished in both folders; nothing is written. ``aesthetic``: an
    :class:`bindweave.quality.aesthetic.AestheticScorer` (or anything with ``score(frames) -> float``)
    scores each video; None leaves the aesthetic fields null.

    Raises BindWeaveInputError for a missing folder, an option below 1 or no sample in common."""
    reference_dir, candidate_dir = Path(reference_dir).resolve(), Path(candidate_dir).resolve()
    for name, value in (("frame_stride", frame_stride), ("tile_width", tile_width)):
        if value < 1:
            raise BindWeaveInputError(f"{name} must be at least 1, got {value}.")
    for role, folder in (("reference", reference_dir), ("candidate", candidate_dir)):
        if not folder.is_dir():
            raise BindWeaveInputError(f"The {role} folder {folder} does not exist or is not a folder: check the path.")
    reference_ids, candidate_ids = finished_samples(reference_dir), finished_samples(candidate_dir)
    common = sorted(reference_ids & candidate_ids)
    if not common:
        raise BindWeaveInputError(
            f"No sample is finished in both {reference_dir} ({len(reference_ids)} finished) and "
            f"{candidate_dir} ({len(candidate_ids)} finished): a finished sample is an ID.mp4 with its "
            f"ID.json beside it, and both runs must have made the same sample ids."
        )
    samples, rows = [], []
    for sample_id in common:
        record, tiles = compare_sample(sample_id, reference_dir, candidate_dir, frame_stride, tile_width, aesthetic)
        samples.append(record)
        if tiles:
            rows.append(tiles)
    summary = summarize(samples, frame_stride)
    summary.update(reference_dir=str(reference_dir), candidate_dir=str(candidate_dir),
                   only_in_reference=sorted(reference_ids - candidate_ids),
                   only_in_candidate=sorted(candidate_ids - reference_ids))
    report = {"summary": summary, "samples": samples}
    return Comparison(report, markdown_report(report), contact_sheet(rows) if rows else None)


def write_comparison(comparison: Comparison, out_dir: str | os.PathLike) -> list[Path]:
    """Write compare.json, compare.md and contact_sheet.png into `out_dir`, each atomically; returns
    the paths written. The JSON goes last, so its presence marks a finished report."""
    out_dir = Path(out_dir)
    written = [out_dir / MARKDOWN_NAME]
    with atomic_write(out_dir / MARKDOWN_NAME) as temp_path:  # creates out_dir, or says why it cannot
        temp_path.write_text(comparison.markdown, encoding="utf-8")
    sheet_path = out_dir / SHEET_NAME
    if comparison.sheet is None:
        sheet_path.unlink(missing_ok=True)  # a sheet of an earlier report must not sit beside this one
    else:
        with atomic_write(sheet_path) as temp_path:
            comparison.sheet.save(temp_path)
        written.append(sheet_path)
    write_json(out_dir / JSON_NAME, json_safe(comparison.report))
    return written + [out_dir / JSON_NAME]


def finished_samples(folder: Path) -> set[str]:
    """Ids of the samples finished in `folder`: an `ID.mp4` with its `ID.json` beside it."""
    return {path.stem for path in folder.glob("*.mp4") if video_done(path)}


def compare_sample(sample_id: str, reference_dir: Path, candidate_dir: Path, frame_stride: int = 1,
                   tile_width: int = 256, aesthetic=None) -> tuple[dict, list[Image.Image]]:
    """One sample's record (its numbers, or an `error`) and its six labelled contact-sheet tiles
    (none when one of its videos cannot be read)."""
    record = {"sample_id": sample_id, "error": None, "frames": None, "height": None, "width": None,
              "psnr_db": None, "ssim": None, "latent_rel_error": None, "latent_note": None,
              "reference_motion": None, "candidate_motion": None, "motion_ratio": None,
              "reference_aesthetic": None, "candidate_aesthetic": None,
              "reference_denoise_s": None, "candidate_denoise_s": None, "speedup": None,
              "reference_speed": None, "candidate_speed": None}
    tiles = []
    try:
        record.update(speed_fields(read_sidecar(reference_dir / f"{sample_id}.json"),
                                   read_sidecar(candidate_dir / f"{sample_id}.json")))
        reference = read_frames(reference_dir / f"{sample_id}.mp4")
        candidate = read_frames(candidate_dir / f"{sample_id}.mp4")
        # Tiled before the layout check: a sheet row shows what differs.
        tiles = [labelled_tile(label, frame, tile_width)
                 for label, frame in picked_frames(sample_id, reference, "reference")
                 + picked_frames(sample_id, candidate, "candidate")]
        require_same_layout(reference, candidate)
        frames, height, width = reference.shape[:3]
        record.update(frames=frames, height=height, width=width, psnr_db=psnr(reference, candidate),
                      ssim=mean_ssim(reference, candidate, frame_stride))
        record.update(motion_fields(motion_amplitude(reference), motion_amplitude(candidate)))
        if aesthetic is not None:
            record.update(reference_aesthetic=aesthetic.score(reference), candidate_aesthetic=aesthetic.score(candidate))
        record.update(latent_fields(sample_id, reference_dir, candidate_dir))
    except BindWeaveInputError as error:
        record.update(error=str(error), psnr_db=None, ssim=None)
    return record, tiles


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR in dB of uint8 videos `[F, H, W, 3]` over all frames (data range 255); inf when identical."""
    # Frame by frame: a float64 copy of a whole 720P video would take ~1.8 GB.
    squared_error = sum(float(np.square(a.astype(np.float64) - b).sum()) for a, b in zip(reference, candidate))
    mse = squared_error / reference.size
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def mean_ssim(reference: np.ndarray, candidate: np.ndarray, frame_stride: int = 1) -> float:
    """Mean SSIM of every `frame_stride`-th frame pair of uint8 RGB videos `[F, H, W, 3]`."""
    scores = [structural_similarity(a, b, channel_axis=-1, data_range=255)
              for a, b in zip(reference[::frame_stride], candidate[::frame_stride])]
    return float(np.mean(scores))


def latent_relative_error(reference_path: Path, candidate_path: Path) -> float:
    """||reference - candidate|| / ||reference|| of the `"latents"` tensors of two files, in float64."""
    reference, candidate = read_latents(reference_path), read_latents(candidate_path)
    if reference.shape != candidate.shape:
        raise BindWeaveInputError(f"The latents differ in shape: {list(reference.shape)} in {reference_path}, "
                                  f"{list(candidate.shape)} in {candidate_path}.")
    return float(torch.linalg.vector_norm(reference - candidate) / torch.linalg.vector_norm(reference))


def latent_fields(sample_id: str, reference_dir: Path, candidate_dir: Path) -> dict:
    paths = [latents_path(folder / f"{sample_id}.mp4") for folder in (reference_dir, candidate_dir)]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        return {"latent_rel_error": None, "latent_note": f"no latents file: {', '.join(missing)}"}
    return {"latent_rel_error": latent_relative_error(*paths), "latent_note": None}


def motion_fields(reference: float | None, candidate: float | None) -> dict:
    return {"reference_motion": reference, "candidate_motion": candidate,
            "motion_ratio": candidate / reference if reference and candidate is not None else None}


def speed_fields(reference_sidecar: dict, candidate_sidecar: dict) -> dict:
    reference_s, candidate_s = denoise_seconds(reference_sidecar), denoise_seconds(candidate_sidecar)
    return {"reference_denoise_s": reference_s, "candidate_denoise_s": candidate_s,
            "speedup": reference_s / candidate_s if reference_s and candidate_s else None,
            "reference_speed": reference_sidecar.get("speed"), "candidate_speed": candidate_sidecar.get("speed")}


def denoise_seconds(sidecar: dict) -> float | None:
    timings = sidecar.get("timings")
    seconds = timings.get("denoise_s") if isinstance(timings, dict) else None
    return float(seconds) if isinstance(seconds, (int, float)) else None


def read_sidecar(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BindWeaveInputError(f"Cannot read the sidecar {path}: {error}") from error
    if not isinstance(record, dict):
        raise BindWeaveInputError(f"The sidecar {path} is not a JSON object.")
    return record


def read_frames(path: Path) -> np.ndarray:
    """All frames of an MP4 as uint8 RGB `[F, H, W, 3]`."""
    try:
        with iio.get_reader(path, format="FFMPEG") as reader:
            # iter_data: list(reader) would take imageio's length (inf while uncounted) as a size hint.
            return np.stack(list(reader.iter_data()))
    except (OSError, RuntimeError, ValueError) as error:
        # imageio's text goes on with ffmpeg's whole log; its first line says what failed.
        first_line = str(error).partition("\n")[0]
        raise BindWeaveInputError(f"Cannot read the video {path}: {first_line}") from error


def read_latents(path: Path) -> torch.Tensor:
    try:
        with safe_open(path, framework="pt") as file:
            if "latents" not in file.keys():
                raise BindWeaveInputError(f"{path} holds no tensor named 'latents' (it has {list(file.keys())}).")
            return file.get_tensor("latents").to(torch.float64)
    except (OSError, SafetensorError) as error:
        raise BindWeaveInputError(f"Cannot read the latents {path}: {error}") from error


def require_same_layout(reference: np.ndarray, candidate: np.ndarray) -> None:
    if reference.shape != candidate.shape:
        raise BindWeaveInputError(f"The videos differ: the reference has {describe_video(reference)}, "
                                  f"the candidate {describe_video(candidate)}.")


def describe_video(frames: np.ndarray) -> str:
    count, height, width = frames.shape[:3]
    return f"{count} frames of {width}x{height}"


def summarize(samples: list[dict], frame_stride: int) -> dict:
    """The summary over the samples compared without error (the folders and lists are added by the caller)."""
    compared = [sample for sample in samples if sample["error"] is None]
    differing = [sample["psnr_db"] for sample in compared if math.isfinite(sample["psnr_db"])]
    latent_errors = [sample["latent_rel_error"] for sample in compared if sample["latent_rel_error"] is not None]
    timed = [sample for sample in compared if sample["speedup"] is not None]
    means = {f"{side}_{metric}": mean_of(compared, f"{side}_{metric}")
             for side in ("reference", "candidate") for metric in ("motion", "aesthetic")}
    return {
        "compared": len(compared), "failed": len(samples) - len(compared),
        "identical_videos": len(compared) - len(differing),
        "mean_psnr_db": float(np.mean(differing)) if differing else (math.inf if compared else None),
        "mean_ssim": float(np.mean([sample["ssim"] for sample in compared])) if compared else None,
        "ssim_frame_stride": frame_stride,
        "max_latent_rel_error": max(latent_errors, default=None), "latents_compared": len(latent_errors),
        "mean_reference_motion": means["reference_motion"], "mean_candidate_motion": means["candidate_motion"],
        "motion_ratio": motion_fields(means["reference_motion"], means["candidate_motion"])["motion_ratio"],
        "mean_reference_aesthetic": means["reference_aesthetic"],
        "mean_candidate_aesthetic": means["candidate_aesthetic"],
        # Total over total: long samples weigh as much as they cost.
        "denoise_speedup": (sum(sample["reference_denoise_s"] for sample in timed)
                            / sum(sample["candidate_denoise_s"] for sample in timed)) if timed else None,
    }


def mean_of(samples: list[dict], field: str) -> float | None:
    """The mean of ``field`` over the samples that have it (None: none has)."""
    values = [sample[field] for sample in samples if sample[field] is not None]
    return float(np.mean(values)) if values else None


def json_safe(value):
    """`value` with every non-finite float written as its text ("inf"): JSON has no infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


# compare.md's table: (header, the sample's field, the summary's field, format); the aesthetic
# columns only when a scorer ran.
COLUMNS = [("PSNR (dB)", "psnr_db", "mean_psnr_db", ".2f"), ("SSIM", "ssim", "mean_ssim", ".4f"),
           ("latent rel. error", "latent_rel_error", "max_latent_rel_error", ".3e"),
           ("motion ref (px/frame)", "reference_motion", "mean_reference_motion", ".3f"),
           ("motion cand (px/frame)", "candidate_motion", "mean_candidate_motion", ".3f")]
AESTHETIC_COLUMNS = [("aesthetic ref", "reference_aesthetic", "mean_reference_aesthetic", ".3f"),
                     ("aesthetic cand", "candidate_aesthetic", "mean_candidate_aesthetic", ".3f")]
TIMING_COLUMNS = [("denoise ref (s)", "reference_denoise_s", None, ".1f"),
                  ("denoise cand (s)", "candidate_denoise_s", None, ".1f"), ("speed-up", "speedup", "denoise_speedup", "x")]


def markdown_report(report: dict) -> str:
    """compare.md: the folders, one table row per sample plus the summary row, then the notes."""
    summary = report["summary"]
    scored = summary["mean_reference_aesthetic"] is not None
    columns = COLUMNS + (AESTHETIC_COLUMNS if scored else []) + TIMING_COLUMNS
    lines = [f"Reference: `{summary['reference_dir']}`  ", f"Candidate: `{summary['candidate_dir']}`", "",
             "| sample | " + " | ".join(header for header, *_ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for sample in report["samples"]:
        lines.append(table_row(sample["sample_id"].replace("|", "\\|"),
                               [(sample[field], spec) for _, field, _, spec in columns]))
    lines.append(table_row(f"**all ({summary['compared']})**",
                           [(summary[field] if field else None, spec) for _, _, field, spec in columns]))
    lines += ["", f"All: mean PSNR over the samples whose videos differ ({summary['identical_videos']} identical: "
              f"PSNR inf), mean SSIM (frame stride {summary['ssim_frame_stride']}), max latent error, "
              f"mean motion amplitude of each run (optical flow, pixels per frame; candidate / reference "
              f"{ratio_text(summary['motion_ratio'])}), "
              + ("mean aesthetic score of each run (LAION predictor on CLIP ViT-L/14, as OpenS2V-Eval), " if scored
                 else "") + "total denoise time ratio."]
    notes = [f"- {sample['sample_id']}: **not compared**: {sample['error']}"
             for sample in report["samples"] if sample["error"]]
    notes += [f"- {sample['sample_id']}: {sample['latent_note']}"
              for sample in report["samples"] if sample["latent_note"]]
    notes += [f"- only in the {side}: {', '.join(summary[f'only_in_{side}'])}"
              for side in ("reference", "candidate") if summary[f"only_in_{side}"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def table_row(sample: str, cells: list[tuple[float | None, str]]) -> str:
    """One row: ``cells`` are (value, format); format "x" writes a ratio."""
    texts = [ratio_text(value) if spec == "x" else number(value, spec) for value, spec in cells]
    return "| " + " | ".join([sample] + texts) + " |"


def ratio_text(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


def number(value: float | None, spec: str) -> str:
    if value is None:
        return "—"
    return "inf" if math.isinf(value) else format(value, spec)


def picked_frames(sample_id: str, frames: np.ndarray, side: str) -> list[tuple[str, np.ndarray]]:
    """(label, frame) of the first, middle and last frame of one video."""
    last = len(frames) - 1
    return [(f"{sample_id} {side} frame {index}", frames[index]) for index in (0, last // 2, last)]


def labelled_tile(label: str, frame: np.ndarray, tile_width: int) -> Image.Image:
    """`frame` scaled to `tile_width` (aspect kept) under a black band with `label`, clipped to the tile."""
    height, width = frame.shape[:2]
    scaled = Image.fromarray(frame).resize((tile_width, max(1, round(height * tile_width / width))),
                                           Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (tile_width, LABEL_BAND_PX + scaled.height))
    tile.paste(scaled, (0, LABEL_BAND_PX))
    ImageDraw.Draw(tile).text((2, 1), label, fill="white", font=ImageFont.load_default())
    return tile


def contact_sheet(rows: list[list[Image.Image]]) -> Image.Image:
    """The tiles of each row side by side, the rows one under another (a row as high as its highest tile)."""
    heights = [max(tile.height for tile in row) for row in rows]
    sheet = Image.new("RGB", (max(sum(tile.width for tile in row) for row in rows), sum(heights)))
    top = 0
    for row, height in zip(rows, heights):
        left = 0
        for tile in row:
            sheet.paste(tile, (left, top))
            left += tile.width
        top += height
    return sheet
