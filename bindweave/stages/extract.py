"""Stage 2: Qwen2.5-VL hidden states for every sample of a meta JSON (SPEC §3, §7).

Per sample, two prefill passes over the same pre-scaled references: the sample's prompt, then the
Qwen negative prompt. Both land in one safetensors file `<output_dir>/hidden_states/<id>.safetensors`
(tensors `positive`, `negative`, bf16 `[1, L, hidden]`) whose header records what made it; with
`write_official_pt` the official pair `<id>_hidden_states.pt` / `<id>_hidden_states_negative.pt`
is written beside it. A NEW meta JSON names the files; the input is never rewritten.

Resume: a sample whose file exists and whose header matches the current prompt, image bytes and
model is skipped without a forward (a missing .pt pair is then written from it). The safetensors
file is written last, so it marks a finished sample. Under torchrun or srun (parallel.distributed),
rank r takes samples r, r + world, ...; rank 0 writes the meta JSON once every rank has passed a
barrier.

A bad sample (malformed entry, missing or unreadable image, ...) ends the run with on_error=fail
(exit 2, one message naming it). With on_error=skip it is reported, the others finish, and it is
left out of the new meta JSON (every entry there has its hidden states, so stage 3 can run it);
`<output_dir>/failed.json` names each failed sample and why, and the exit code is 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from bindweave.io.inputs import (Sample, load_hidden_states, load_reference_image, read_meta, require_safe_sample_id,
                                 save_hidden_states)
from bindweave.errors import BindWeaveInputError
from bindweave.io.outputs import atomic_write, write_json
from bindweave.stages.memory import memory_snapshot
from bindweave.encoders.prompts import QWEN_NEGATIVE_PROMPT
from bindweave.encoders.qwen import (
    QwenVL,
    build_inputs,
    image_token_counts,
    prefill_hidden_states,
    prescale_references,
)

log = logging.getLogger("bindweave")

# Bump when the recipe changes (message, pre-scale, layer): files of an older recipe are redone.
RECIPE = "bindweave-qwen2.5-vl-last-norm-1"
SAVED_DTYPE = torch.bfloat16  # the official files' dtype (SPEC §3)
HIDDEN_STATES_DIR = "hidden_states"
DEFAULT_META_NAME = "meta_with_features.json"
# Ranks wait for the slowest one before the meta JSON is written; a sample can take minutes.
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class ExtractSettings:
    output_dir: Path
    output_meta: Path | None = None  # None: <output_dir>/meta_with_features.json
    write_official_pt: bool = False  # also write the official .pt pair and point the meta JSON at it
    progress: bool = True

    @property
    def meta_path(self) -> Path:
        return self.output_meta or self.output_dir / DEFAULT_META_NAME


@dataclass(frozen=True)
class SampleFiles:
    """Where one sample's hidden states go."""

    safetensors: Path
    positive_pt: Path
    negative_pt: Path

    @classmethod
    def of(cls, output_dir: Path, sample_id: str) -> SampleFiles:
        folder = output_dir / HIDDEN_STATES_DIR
        return cls(folder / f"{sample_id}.safetensors", folder / f"{sample_id}_hidden_states.pt",
                   folder / f"{sample_id}_hidden_states_negative.pt")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    if not path.is_file():
        raise BindWeaveInputError(f"Reference image {path} does not exist: check img_paths and the image root folder.")
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(qwen: QwenVL, sample: Sample) -> dict[str, str]:
    """What a saved file must match to be reused: recipe, model, dtype, prompts, image bytes."""
    return {
        "recipe": RECIPE,
        "model_fingerprint": qwen.identity["fingerprint"],
        "model_dtype": qwen.identity["dtype"],
        "prompt_sha256": sha256_text(sample.prompt),
        "negative_prompt_sha256": sha256_text(QWEN_NEGATIVE_PROMPT),
        "image_sha256": json.dumps([sha256_file(path) for path in sample.image_paths]),
    }


def is_done(files: SampleFiles, expected: dict[str, str]) -> bool:
    """True when the sample's safetensors file exists with a header matching `expected`."""
    if not files.safetensors.is_file():
        return False
    try:
        with safe_open(files.safetensors, framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError):  # damaged: redo it
        return False
    return all(header.get(key) == value for key, value in expected.items())


def write_official_pair(files: SampleFiles, positive: torch.Tensor, negative: torch.Tensor) -> None:
    """The official format: `torch.save` of each bare tensor, positive and negative apart."""
    for path, tensor in ((files.positive_pt, positive), (files.negative_pt, negative)):
        with atomic_write(path) as temp_path:
            torch.save(tensor, temp_path)


def prompt_hidden_states(qwen: QwenVL, prompt: str, images: list) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Both passes for a prompt and its reference images (stage 2's, and the server's in memory):
    the positive and negative hidden states on the CPU in the saved dtype, and the positive inputs."""
    scaled = prescale_references(images)
    positive_inputs = build_inputs(qwen, prompt, scaled)
    positive = prefill_hidden_states(qwen.model, positive_inputs).to(SAVED_DTYPE).cpu()
    negative = prefill_hidden_states(qwen.model, build_inputs(qwen, QWEN_NEGATIVE_PROMPT, scaled)).to(SAVED_DTYPE).cpu()
    return positive, negative, positive_inputs


def extract_sample(qwen: QwenVL, sample: Sample, files: SampleFiles, expected: dict[str, str],
                   write_official_pt: bool) -> dict[str, str]:
    """Run both passes for one sample and write its files; returns the header written."""
    positive, negative, positive_inputs = prompt_hidden_states(
        qwen, sample.prompt, [load_reference_image(path) for path in sample.image_paths])
    header = {
        **expected,
        "model": str(qwen.identity["model"]),
        "model_revision": str(qwen.identity["revision"] or ""),
        "positive_length": str(positive.shape[1]),
        "negative_length": str(negative.shape[1]),
        "image_tokens": json.dumps(image_token_counts(qwen, positive_inputs)),
    }
    if write_official_pt:
        write_official_pair(files, positive, negative)
    save_hidden_states(files.safetensors, positive, negative, header)  # last: marks the sample done
    return header


def extract_samples(qwen: QwenVL, samples: list[Sample], settings: ExtractSettings,
                    rank: int = 0, world_size: int = 1, skip_errors: bool = False) -> dict:
    """Extract this rank's share of `samples` (sorted order, strided by rank); skip finished ones.

    Returns ``{"done": [ids], "skipped": [ids], "failed": {id: reason}, "report": {...}}`` (the
    report: this rank, seconds per extracted sample, peak GPU memory and host RSS). A sample's input error
    raises, naming the sample, unless ``skip_errors`` (on_error=skip): then it is logged, recorded
    in ``failed`` and the next sample goes on.
    """
    summary = {"done": [], "skipped": [], "failed": {}}
    seconds = {}
    mine = samples[rank::world_size]
    for sample in tqdm(mine, desc="samples", disable=not settings.progress or rank != 0):
        try:
            outcome, elapsed = _extract_or_skip(qwen, sample, settings)
        except BindWeaveInputError as error:
            if not skip_errors:
                raise BindWeaveInputError(f"sample {sample.sample_id!r}: {error}") from None
            log.error("%s: %s (skipped; on_error=skip)", sample.sample_id, error)
            summary["failed"][sample.sample_id] = str(error)
            continue
        summary[outcome].append(sample.sample_id)
        if outcome == "done":
            seconds[sample.sample_id] = round(elapsed, 3)
    summary["report"] = {"rank": rank, "extract_s": seconds, **memory_snapshot(qwen.model.device)}
    return summary


def _extract_or_skip(qwen: QwenVL, sample: Sample, settings: ExtractSettings) -> tuple[str, float]:
    """One sample: ("skipped", 0) when its file is already there, else ("done", seconds) once extracted."""
    files = SampleFiles.of(settings.output_dir, sample.sample_id)
    expected = provenance(qwen, sample)
    if is_done(files, expected):
        log.info("%s: already extracted with this prompt, images and model (%s), skipping",
                 sample.sample_id, files.safetensors)
        if settings.write_official_pt and not (files.positive_pt.is_file() and files.negative_pt.is_file()):
            positive, negative = (load_hidden_states(files.safetensors, negative=side, hidden_dim=qwen.hidden_size)
                                  for side in (False, True))
            write_official_pair(files, positive, negative)
        return "skipped", 0.0
    started = time.perf_counter()
    header = extract_sample(qwen, sample, files, expected, settings.write_official_pt)
    elapsed = time.perf_counter() - started
    log.info("%s: L = %s (negative %s), image tokens %s, %.2f s -> %s", sample.sample_id,
             header["positive_length"], header["negative_length"], header["image_tokens"], elapsed, files.safetensors)
    return "done", elapsed


def write_meta_with_features(samples: list[Sample], settings: ExtractSettings) -> Path:
    """The input samples (every field kept) plus the paths of their hidden states, atomically.

    Paths are relative to the new meta file's folder, as `read_meta` resolves them; an old
    `hidden_states_path_negative` is dropped unless the .pt pair was written.
    """
    meta_path = settings.meta_path
    entries = {}
    for sample in samples:
        files = SampleFiles.of(settings.output_dir, sample.sample_id)
        if not files.safetensors.is_file():
            raise BindWeaveInputError(f"{files.safetensors} is missing after extraction: a rank failed; re-run "
                                      f"the same command to finish (finished samples are skipped).")
        entry = {key: value for key, value in sample.fields.items() if key != "hidden_states_path_negative"}
        if settings.write_official_pt:
            entry["hidden_states_path"] = os.path.relpath(files.positive_pt, meta_path.parent)
            entry["hidden_states_path_negative"] = os.path.relpath(files.negative_pt, meta_path.parent)
        else:
            entry["hidden_states_path"] = os.path.relpath(files.safetensors, meta_path.parent)
        entries[sample.sample_id] = entry
    write_json(meta_path, entries)
    return meta_path


def check_output_paths(meta_path: Path, samples: list[Sample], settings: ExtractSettings) -> None:
    """Refuse outputs that would overwrite the input or escape the output folder.

    `read_meta` already refuses unsafe ids; this checks again for samples built any other way.
    """
    if settings.meta_path.resolve() == meta_path.resolve():
        raise BindWeaveInputError(f"output_meta {settings.meta_path} is the input meta file: stage 2 never "
                                  f"rewrites its input; choose another output_meta or output_dir.")
    for sample in samples:
        require_safe_sample_id(sample.sample_id, f"Meta file {meta_path}, sample {sample.sample_id!r}")


def run_extract(qwen: QwenVL, meta_path: Path, image_root: Path | None, settings: ExtractSettings,
                rank: int = 0, world_size: int = 1, barrier=lambda: None, on_error: str = "fail",
                gather=lambda value: [value], summary: dict | None = None) -> Path | None:
    """Extract every sample of `meta_path`; rank 0 returns the new meta JSON's path, others None.

    ``on_error="fail"``: a bad sample raises, naming it. ``"skip"``: it is logged and left out of the
    meta JSON; when every sample failed there is nothing to hand on, so no meta JSON is written (an
    older one is removed) and None is returned. ``summary`` (a dict) receives on every rank the run's
    ``done`` / ``skipped`` ids and ``failed`` (id -> reason) over all ranks: ``gather`` collects one
    value from each rank, in rank order.
    """
    skip_errors = on_error == "skip"
    invalid: dict[str, str] = {}
    samples = read_meta(meta_path, image_root, invalid=invalid if skip_errors else None)
    if rank == 0:  # every rank reads the same file: one report
        for sample_id, reason in invalid.items():
            log.error("%s: %s (skipped; on_error=skip)", sample_id, reason)
    check_output_paths(meta_path, samples, settings)
    mine = extract_samples(qwen, samples, settings, rank, world_size, skip_errors)
    log.info("rank %d: %d extracted, %d already there, %d failed", rank, len(mine["done"]),
             len(mine["skipped"]), len(mine["failed"]))
    barrier()
    total = {"done": [], "skipped": [], "failed": dict(invalid), "ranks": []}
    for part in gather(mine):
        total["done"] += part["done"]
        total["skipped"] += part["skipped"]
        total["failed"].update(part["failed"])
        total["ranks"].append(part["report"])
    if summary is not None:
        summary.update(total)
    if rank != 0:
        return None
    extracted = [sample for sample in samples if sample.sample_id not in total["failed"]]
    if not extracted:
        settings.meta_path.unlink(missing_ok=True)
        return None
    return write_meta_with_features(extracted, settings)
