"""Stage 3 end to end on the tiny model set: MP4s + sidecars, resume, no partial output, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bindweave.io.inputs import load_hidden_states, read_meta, save_hidden_states
from bindweave.testing.demo_cases import write_demo_cases
from bindweave.errors import BindWeaveInputError
from bindweave.io.outputs import read_mp4_info
from bindweave.stages.batch import RunSettings
from support.engines import run_batch_on
from bindweave.stages.phases import dit_predictor, prepare_inputs
from support.engines import build_models
from bindweave.settings.model import ModelSettings, VideoSettings
from bindweave.encoders.prompts import T5_NEGATIVE_PROMPT
from bindweave.sampling.sampler import Step
from bindweave.settings.sampling import SamplerSettings

REPO = Path(__file__).resolve().parents[1]
VIDEO = VideoSettings(height=48, width=64, num_frames=5)
SAMPLER = SamplerSettings(num_steps=2)


@pytest.fixture(scope="module")
def tiny_root(tiny_models):
    return tiny_models.wan.parent


@pytest.fixture(scope="module")
def models(tiny_root, tmp_path_factory):
    settings = ModelSettings(dit=None, wan=None, tiny_root=str(tiny_root), dtype="float32", device="cpu",
                             cache_dir=str(tmp_path_factory.mktemp("cache")))
    return build_models(settings)


@pytest.fixture
def cases(tmp_path, models):
    """The demo cases with seeded stand-in hidden states of the tiny width."""
    meta = json.loads(write_demo_cases(tmp_path / "cases").read_text())
    generator = torch.Generator().manual_seed(0)
    for sample_id, entry in meta.items():
        path = tmp_path / "cases" / f"{sample_id}.safetensors"
        save_hidden_states(path, torch.randn(1, 9, models.hidden_dim, generator=generator),
                           torch.randn(1, 11, models.hidden_dim, generator=generator), {})
        entry["hidden_states_path"] = path.name
    meta_path = tmp_path / "cases" / "meta_features.json"
    meta_path.write_text(json.dumps(meta))
    return meta_path


def run(models, meta_path, output_dir, **options):
    settings = RunSettings(meta_path=meta_path, image_root=None, output_dir=output_dir, progress=False, **options)
    return run_batch_on(models, settings, VIDEO, SAMPLER)


def test_end_to_end_writes_valid_mp4s_and_sidecars_then_resumes(models, cases, tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    summary = run(models, cases, output_dir)
    assert len(summary["done"]) == 3
    for sample in read_meta(cases):
        info = read_mp4_info(output_dir / f"{sample.sample_id}.mp4")
        assert (info["frames"], info["fps"], info["width"], info["height"]) == (5, 16, 64, 48)
        sidecar = json.loads((output_dir / f"{sample.sample_id}.json").read_text())
        assert sidecar["prompt"] == sample.prompt and sidecar["seed"] == 1234 and sidecar["num_steps"] == 2
        timings = sidecar["timings"]
        assert set(timings) >= {"conditioning_s", "denoise_s", "decode_s", "write_s", "first_step_s"}
        assert 0 < timings["first_step_s"] < timings["denoise_s"]  # 1 of the 2 steps
        assert sidecar["models"]["dit"]["fingerprint"] and sidecar["versions"]["torch"]
    assert not [p for p in output_dir.iterdir() if ".tmp" in p.name]

    import bindweave.stages.engine as engine

    monkeypatch.setattr(engine, "generate_sample", lambda *a, **k: pytest.fail("finished sample redone"))
    assert len(run(models, cases, output_dir)["skipped"]) == 3


def test_same_seed_same_video_and_per_sample_seed(models, cases, tmp_path):
    meta = json.loads(cases.read_text())
    only = {"demo_face_1": meta["demo_face_1"]}
    (cases.parent / "one.json").write_text(json.dumps(only))
    run(models, cases.parent / "one.json", tmp_path / "a")
    run(models, cases.parent / "one.json", tmp_path / "b")
    assert (tmp_path / "a/demo_face_1.mp4").read_bytes() == (tmp_path / "b/demo_face_1.mp4").read_bytes()
    only["demo_face_1"]["seed"] = 99
    (cases.parent / "one.json").write_text(json.dumps(only))
    run(models, cases.parent / "one.json", tmp_path / "c")
    assert json.loads((tmp_path / "c/demo_face_1.json").read_text())["seed"] == 99
    assert (tmp_path / "a/demo_face_1.mp4").read_bytes() != (tmp_path / "c/demo_face_1.mp4").read_bytes()


def test_negative_side_gets_the_negative_t5_and_qwen_inputs(models, cases):
    sample = read_meta(cases)[0]
    inputs = prepare_inputs(models, sample, VIDEO)
    torch.testing.assert_close(inputs.t5["negative"], models.text_encoder.encode([T5_NEGATIVE_PROMPT]))
    torch.testing.assert_close(inputs.t5["positive"], models.text_encoder.encode([sample.prompt]))
    torch.testing.assert_close(inputs.qwen["negative"], load_hidden_states(sample.hidden_states_path, negative=True,
                                                                          hidden_dim=models.hidden_dim))
    torch.testing.assert_close(inputs.qwen["positive"], load_hidden_states(sample.hidden_states_path,
                                                                          hidden_dim=models.hidden_dim))

    calls = []

    class Recorder(torch.nn.Module):
        dtype = torch.float32

        def forward(self, latents, timestep, *, t5_embeds, qwen_states, clip_embeds, condition):
            calls.append((t5_embeds, qwen_states, clip_embeds, condition))
            return latents

    predict = dit_predictor(Recorder(), inputs)
    latents = torch.zeros(VIDEO.latent_shape)
    step = Step(index=0, num_steps=1, timestep=torch.tensor([999]))
    predict(latents, step.for_side("positive"))
    predict(latents, step.for_side("negative"))
    assert calls[0][0] is inputs.t5["positive"] and calls[0][1] is inputs.qwen["positive"]
    assert calls[1][0] is inputs.t5["negative"] and calls[1][1] is inputs.qwen["negative"]
    assert calls[0][2] is calls[1][2] and calls[0][3] is calls[1][3]  # same image conditions


def test_video_condition_is_computed_once_per_resolution(models, cases, tmp_path, monkeypatch):
    encodes = []
    original = models.vae.encode
    monkeypatch.setattr(models.vae, "encode", lambda video: encodes.append(video.shape) or original(video))
    run(models, cases, tmp_path / "out", overwrite=True)
    full_clips = [shape for shape in encodes if shape[2] == VIDEO.num_frames]
    assert len(full_clips) <= 1  # 0 when an earlier test in this process filled the cache


def _write_meta(folder, entries):
    path = folder / "meta.json"
    path.write_text(json.dumps(entries) if not isinstance(entries, str) else entries)
    return path


@pytest.mark.parametrize("case", ["missing-image", "unreadable-image", "malformed-json", "missing-hidden-states",
                                  "wrong-hidden-shape"])
def test_bad_input_gives_one_clear_error_and_no_output(models, cases, tmp_path, case):
    folder = cases.parent
    entry = json.loads(cases.read_text())["demo_face_1"]
    named = None
    if case == "missing-image":
        entry["img_paths"] = ["images/nope.png"]
        named = "nope.png"
    elif case == "unreadable-image":
        (folder / "images" / "bad.png").write_text("not an image")
        entry["img_paths"] = ["images/bad.png"]
        named = "bad.png"
    elif case == "missing-hidden-states":
        del entry["hidden_states_path"]
        named = "hidden_states_path"
    elif case == "wrong-hidden-shape":
        save_hidden_states(folder / "wrong.safetensors", torch.zeros(1, 4, 7), torch.zeros(1, 4, 7), {})
        entry["hidden_states_path"] = "wrong.safetensors"
        named = "wrong.safetensors"
    meta = _write_meta(folder, "{not json" if case == "malformed-json" else {"demo_face_1": entry})
    named = named or "meta.json"
    with pytest.raises(BindWeaveInputError) as error:
        run(models, meta, tmp_path / "out")
    assert named in str(error.value)
    assert not list((tmp_path / "out").glob("*.mp4")) if (tmp_path / "out").exists() else True


def test_on_error_skip_finishes_the_other_samples(models, cases, tmp_path):
    meta = json.loads(cases.read_text())
    meta["demo_face_1"]["img_paths"] = ["images/nope.png"]
    path = _write_meta(cases.parent, meta)
    summary = run(models, path, tmp_path / "out", on_error="skip")
    assert list(summary["failed"]) == ["demo_face_1"] and len(summary["done"]) == 2
    assert not (tmp_path / "out/demo_face_1.mp4").exists()


def _generate_command(output_dir, *overrides):
    return [sys.executable, str(REPO / "launch/generate.py"), f"output_dir={output_dir}", "sampler.num_steps=2",
            "video.height=48", "video.width=64", "video.num_frames=5", "progress=false", *overrides]


@pytest.mark.timeout(300)
def test_killed_run_leaves_no_partial_mp4_and_rerun_completes(tmp_path):
    """SIGKILL the entry point mid-run: every MP4 present is complete; the re-run finishes the rest."""
    output_dir = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(_generate_command(output_dir), cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if output_dir.exists() and any(output_dir.glob("[!.]*.json")):
            break  # one sample finished: kill during the next one
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    for video in output_dir.glob("[!.]*.mp4"):
        assert read_mp4_info(video)["frames"] == 5
    finished = {p.stem for p in output_dir.glob("[!.]*.json")}
    assert len(finished) < 3, "the run finished before it could be killed"
    rerun = subprocess.run(_generate_command(output_dir), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {p.stem for p in output_dir.glob("[!.]*.json")} == {
        "demo_dog_teapot_2", "demo_face_1", "demo_face_dog_house_3"}
    for video in output_dir.glob("[!.]*.mp4"):
        assert read_mp4_info(video)["frames"] == 5


@pytest.mark.timeout(300)
def test_entry_point_exits_2_with_one_message_for_bad_meta(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text("[1, 2]")
    result = subprocess.run(_generate_command(tmp_path / "out", f"data.meta_path={meta}"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and str(meta) in result.stderr
    assert not list((tmp_path / "out").glob("*.mp4"))
