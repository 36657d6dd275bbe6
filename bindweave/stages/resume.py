"""Resume that notices changes: a finished video is reused only if it was made from the same job.

Each sidecar keeps a ``recipe``: everything that determines the video (the prompt, the hashes of
the reference images and hidden-state files, seed, steps, guidance, schedule, size, the model
folders' fingerprints, dtype and speed options). A re-run into the same output folder compares the
recipe it would use with the one on disk: equal, the sample is skipped; different, the run is
refused before any model loads, naming each sample and what changed, because silently keeping
a video made with other settings (or silently replacing it) both lose the user's trust;
``overwrite=true`` redoes such samples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from bindweave.errors import BindWeaveInputError

SHOWN_CONFLICTS = 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_recipe(prompt: str, inputs: dict[str, list[str]], seed: int, video, sampler, models: dict,
                  model_options: dict) -> dict:
    """What determines one sample's video. ``inputs``: the hashes of its reference images and
    hidden states (``Stage3Job.input_hashes``). ``models``: folder fingerprints
    (``folder_fingerprint``); only their content identity counts, so moving the weights does not
    invalidate videos."""
    return {
        "prompt": prompt,
        "images": inputs["images"],
        "hidden_states": inputs["hidden_states"],
        "seed": seed,
        "sampler": sampler.recipe(),
        "video": asdict(video),
        "models": {name: {key: info[key] for key in ("revision", "fingerprint")} for name, info in models.items()},
        "model_options": model_options,
    }


def changes(before: dict, now: dict, prefix: str = "") -> list[str]:
    """The recipe entries that differ, as ``key: before -> now`` (hashes shortened)."""
    found = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += changes(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {_short(old)} -> {_short(new)}")
    return found


def _short(value) -> str:
    text = json.dumps(value)
    if isinstance(value, list) and all(isinstance(v, str) and len(v) == 64 for v in value):
        text = "[" + ", ".join(v[:8] for v in value) + "]"  # sha256 hashes
    return text if len(text) <= 60 else text[:57] + "..."


def recorded_recipe(sidecar: Path) -> dict | None:
    """The recipe a finished sample's sidecar holds (None: an unreadable sidecar or an older one)."""
    try:
        return json.loads(sidecar.read_text()).get("recipe")
    except (OSError, ValueError):
        return None


def refuse_changed_samples(conflicts: dict[str, list[str]], output_dir: Path) -> None:
    """One error listing each finished sample whose recipe differs from this run's."""
    if not conflicts:
        return
    lines = [f"  - {sample_id}: {'; '.join(changed)}" for sample_id, changed in
             list(sorted(conflicts.items()))[:SHOWN_CONFLICTS]]
    more = len(conflicts) - SHOWN_CONFLICTS
    raise BindWeaveInputError(
        f"{len(conflicts)} finished video(s) in {output_dir} were made from a different job than this run "
        f"asks for (nothing was loaded or written); overwrite=true redoes them, or choose another output_dir=:\n"
        + "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else ""))
