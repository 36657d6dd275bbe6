"""Resume that notices changes (bindweave/stages/resume.py): a finished video is skipped only when its
sidecar's recipe is this run's; a changed job is refused before loading, naming what changed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bindweave.settings.model import VideoSettings
from bindweave.stages.resume import changes, sample_recipe
from bindweave.settings.sampling import SamplerSettings
from parallel_launch import REPO, plain_env

TINY = ["video.height=48", "video.width=64", "video.num_frames=5", "sampler.num_steps=2"]


def test_the_recipe_names_each_change():
    inputs = {"images": ["a" * 64], "hidden_states": ["b" * 64]}
    models = {"dit": {"folder": "/a", "revision": None, "fingerprint": "f1"}}
    base = sample_recipe("a prompt", inputs, 1, VideoSettings(), SamplerSettings(), models, {"dtype": "bfloat16"})
    moved = {"dit": {"folder": "/elsewhere", "revision": None, "fingerprint": "f1"}}
    assert changes(base, sample_recipe("a prompt", inputs, 1, VideoSettings(), SamplerSettings(), moved,
                                       {"dtype": "bfloat16"})) == []
    changed = sample_recipe("another prompt", {**inputs, "hidden_states": ["c" * 64]}, 7, VideoSettings(height=480),
                            SamplerSettings(num_steps=4), models, {"dtype": "float32"})
    assert changes(base, changed) == ['hidden_states: [bbbbbbbb] -> [cccccccc]',
                                      'model_options.dtype: "bfloat16" -> "float32"',
                                      'prompt: "a prompt" -> "another prompt"',
                                      "sampler.num_steps: 50 -> 4", "seed: 1 -> 7", "video.height: 720 -> 480"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The demo cases with tiny models, run once into `videos/`."""
    work = tmp_path_factory.mktemp("resume")
    common = [f"model.tiny_root={work / 'tiny'}", f"model.cache_dir={work / 'cache'}", f"data.demo_dir={work / 'demo'}"]
    first = generate(work, common)  # the demo: writes the cases and their hidden states
    assert first.returncode == 0, first.stderr[-3000:]
    # A redirected log: dated lines, one plain line per step, no progress-bar escape codes; the
    # run's log file beside its saved config.
    assert re.search(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO\] .*: step 2/2 \(", first.stderr, re.M)
    assert "\r" not in first.stderr and "\x1b[" not in first.stderr
    (log_file,) = (work / "videos" / ".hydra" / "runs").glob("*/bindweave.log")
    assert "done: 3 written" in log_file.read_text() and "step 1/2" in log_file.read_text()
    meta = work / "demo" / "meta_with_features.json"
    return work, [*common, f"data.meta_path={meta}"], json.loads(meta.read_text())


def generate(work: Path, args: list[str], *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), *TINY, *args,
                           f"output_dir={work / 'videos'}", *more], cwd=work, env=plain_env(),
                          capture_output=True, text=True, timeout=240)


def saved_configs(work: Path) -> list[Path]:
    return sorted((work / "videos" / ".hydra" / "runs").glob("*/config.yaml"))


@pytest.mark.timeout(600)
def test_changed_settings_or_inputs_are_refused_and_overwrite_redoes_them(job):
    work, args, meta = job
    before = {path: path.read_bytes() for path in (work / "videos").glob("*.mp4")}
    assert len(before) == 3 and len(saved_configs(work)) == 1

    same = generate(work, args)  # the same job: every video is reused
    assert same.returncode == 0 and same.stderr.count("already done") == 3, same.stderr[-3000:]

    changed = generate(work, args, "sampler.seed=7", "sampler.num_steps=3")
    assert changed.returncode == 2
    error = changed.stderr[changed.stderr.index("error: "):]
    assert error.startswith("error: 3 finished video(s) in") and "overwrite=true" in error
    assert error.count("sampler.num_steps: 2 -> 3; seed: 1234 -> 7") == 3, error
    assert len(saved_configs(work)) == 2  # the refused run saved nothing; the earlier configs are intact

    # Re-extracted hidden states (other bytes at the same path) are a change too.
    sample_id = sorted(meta)[0]
    states = work / "demo" / meta[sample_id]["hidden_states_path"]
    states.write_bytes(states.read_bytes()[:-1] + bytes([states.read_bytes()[-1] ^ 1]))
    reextracted = generate(work, args)
    assert reextracted.returncode == 2 and f"  - {sample_id}: hidden_states: [" in reextracted.stderr
    assert {path: path.read_bytes() for path in (work / "videos").glob("*.mp4")} == before

    redone = generate(work, args, "overwrite=true", "sampler.seed=7")
    assert redone.returncode == 0, redone.stderr[-3000:]
    sidecar = json.loads((work / "videos" / f"{sample_id}.json").read_text())
    assert sidecar["recipe"]["seed"] == 7 and sidecar["seed"] == 7
