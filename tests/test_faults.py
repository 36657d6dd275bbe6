"""Faults: a rank that dies, a run interrupted anywhere. Nothing hangs, nothing partial is left behind,
and a re-run finishes exactly the samples that were not finished.

- 2 gloo processes under torchrun; one rank is SIGKILLed while the job is denoising: the job ends
  within 60 s with the failure reported once, every MP4 present is complete, and the re-run makes
  only the missing samples;
- an interruption (Ctrl-C) injected at every stage of a sample - conditioning, denoising, decoding,
  in the middle of the MP4 write, between the MP4 and its sidecar, in the middle of the sidecar
  write - leaves no partial or temp file, and the re-run completes exactly the missing samples;
- SIGTERM (what scancel, a Slurm requeue/preemption and torchrun send) in the middle of the MP4
  write: no partial MP4 and no temp file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bindweave.io.outputs import read_mp4_info
from bindweave.stages.batch import RunSettings
from support.engines import run_batch_on
from support.engines import build_models
from bindweave.settings.model import ModelSettings, VideoSettings
from bindweave.settings.sampling import SamplerSettings
from parallel_launch import plain_env  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
VIDEO = VideoSettings(height=48, width=64, num_frames=5)
TINY = ["video.height=48", "video.width=64", "video.num_frames=5"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """cwd of the subprocess runs, with the tiny models and the demo inputs already in `.cache/`
    (as the entry point would make them) and a 6-sample meta file built from the demo cases."""
    from bindweave.testing.demo import demo_meta_with_hidden_states
    from bindweave.testing.tiny import write_tiny_models

    work = tmp_path_factory.mktemp("faults")
    tiny = write_tiny_models(work / ".cache" / "tiny-models")
    hidden_dim = json.loads((tiny.bindweave / "config.json").read_text())["mllm_dim"]
    demo_meta = Path(demo_meta_with_hidden_states(work / ".cache" / "demo-cases", hidden_dim=hidden_dim,
                                                  qwen_folder=tiny.qwen))
    cases = json.loads(demo_meta.read_text())
    meta = {f"{case}_v{v}": {**entry, "seed": 100 + v} for case, entry in cases.items() for v in range(2)}
    (demo_meta.parent / "meta6.json").write_text(json.dumps(meta, indent=1))
    return work


def meta_path(work: Path) -> Path:
    return work / ".cache" / "demo-cases" / "meta6.json"


def sample_ids(work: Path) -> list[str]:
    return sorted(json.loads(meta_path(work).read_text()))


def finished(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("[!.]*.json") if p.with_suffix(".mp4").is_file()} if folder.exists() else set()


def assert_no_partial_output(folder: Path, frames: int = VIDEO.num_frames) -> list[str]:
    """Every visible MP4 is complete and every sidecar has its MP4; returns the temp files left."""
    for video in folder.glob("[!.]*.mp4"):
        assert read_mp4_info(video)["frames"] == frames, f"{video} is incomplete"
    for sidecar in folder.glob("[!.]*.json"):
        assert sidecar.with_suffix(".mp4").is_file(), f"{sidecar} without its video"
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (read from their environment)."""
    found = {}
    for child in Path("/proc").glob("[0-9]*"):
        try:
            if int((child / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            env = dict(item.split("=", 1) for item in (child / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(child.name)
    return found


# --------------------------------------------------------------------------------------------
# a rank dies


@pytest.mark.timeout(400)
def test_a_rank_killed_mid_run_ends_the_job_promptly_and_the_rerun_finishes_the_rest(work, tmp_path):
    output = tmp_path / "out"
    log_path = tmp_path / "torchrun.log"
    ids = sample_ids(work)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "launch/generate.py"), *TINY, "sampler.num_steps=12", "progress=true",
               f"data.meta_path={meta_path(work)}", f"output_dir={output}"]
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(command, cwd=work, env=plain_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        # Wait until a sample is finished AND the next one is being denoised.
        deadline = time.monotonic() + 240
        victim_sample = None
        while time.monotonic() < deadline and launcher.poll() is None:
            done = finished(output)
            if done:
                upcoming = [s for s in ids if s not in done]
                text = log_path.read_text(errors="replace")
                if upcoming and f"{upcoming[0]}: step " in text:  # its step lines (a redirected log)
                    victim_sample = upcoming[0]
                    break
            time.sleep(0.05)
        assert victim_sample, f"never saw denoising after the first sample:\n{log_path.read_text()[-3000:]}"
        ranks = rank_pids(launcher.pid)
        assert set(ranks) == {0, 1}, ranks
        finished_before = {s: (output / f"{s}.json").stat().st_mtime_ns for s in finished(output)}
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = launcher.wait(timeout=90)
        ended_after = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    text = log_path.read_text(errors="replace")
    assert returncode != 0
    assert ended_after < 60, f"the job took {ended_after:.0f} s to end after a rank died"
    # Reported once: one root cause, naming the killed rank and its signal.
    assert text.count("Root Cause") == 1 and text.count("Signal 9 (SIGKILL)") == 1, text[-3000:]
    root_cause = text[text.index("Root Cause"):]
    assert "rank      : 1" in root_cause, root_cause
    temp_files = assert_no_partial_output(output)
    assert all(name.startswith(".") for name in temp_files), temp_files  # never mistaken for outputs
    done_before = set(finished_before)
    assert victim_sample not in done_before and 0 < len(done_before) < len(ids)
    assert finished(output) == done_before  # nothing finished after the kill

    rerun = subprocess.run([sys.executable, str(REPO / "launch/generate.py"), *TINY, "sampler.num_steps=12",
                            "progress=false", f"data.meta_path={meta_path(work)}", f"output_dir={output}"],
                           cwd=work, env=plain_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert finished(output) == set(ids)
    for sample_id, mtime in finished_before.items():
        assert (output / f"{sample_id}.json").stat().st_mtime_ns == mtime, f"{sample_id} was redone"
        assert f"{sample_id}: already done" in rerun.stderr
    assert f"done: {len(ids) - len(done_before)} written, {len(done_before)} already there" in rerun.stderr
    assert_no_partial_output(output)


# --------------------------------------------------------------------------------------------
# an interruption at every stage of a sample (in this process, deterministic)


@pytest.fixture(scope="module")
def models(work):
    return build_models(ModelSettings(dit=None, wan=None, tiny_root=str(work / ".cache" / "tiny-models"),
                                            dtype="float32", device="cpu", cache_dir=str(work / ".cache" / "bw")))


class Interrupt:
    """Raise KeyboardInterrupt (Ctrl-C) the `at`-th time the patched function runs."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


def _patch_stage(stage: str, models, monkeypatch, interrupt_on_sample: int):
    """Patch `stage` so that the interrupt hits while sample number `interrupt_on_sample` (1-based)
    is at that stage."""
    import bindweave.io.outputs as outputs
    import bindweave.stages.phases as pipeline

    if stage == "conditioning":
        interrupt = Interrupt(interrupt_on_sample)
        real = pipeline.prepare_inputs
        monkeypatch.setattr(pipeline, "prepare_inputs", lambda *a, **k: interrupt.tick() or real(*a, **k))
    elif stage == "denoising":  # 2 steps x 2 CFG sides per sample: the 2nd forward of that sample
        interrupt = Interrupt(4 * (interrupt_on_sample - 1) + 2)
        transformer = models.transformer
        real_forward = transformer.forward
        monkeypatch.setattr(transformer, "forward", lambda *a, **k: interrupt.tick() or real_forward(*a, **k))
    elif stage == "decoding":
        interrupt = Interrupt(interrupt_on_sample)
        real_decode = models.vae.decode_to_frames
        monkeypatch.setattr(models.vae, "decode_to_frames", lambda *a, **k: interrupt.tick() or real_decode(*a, **k))
    elif stage == "mp4-write":  # the 3rd of 5 frames of that sample
        interrupt = Interrupt(VIDEO.num_frames * (interrupt_on_sample - 1) + 3)
        real_writer = outputs.iio.get_writer

        def writer(*a, **k):
            handle = real_writer(*a, **k)
            real_append = handle.append_data
            handle.append_data = lambda frame, *x: interrupt.tick() or real_append(frame, *x)
            return handle

        monkeypatch.setattr(outputs.iio, "get_writer", writer)
    elif stage in ("before-sidecar", "sidecar-write"):
        interrupt = Interrupt(interrupt_on_sample)
        real_write_json = pipeline.write_json

        def write_json(path, obj):
            if stage == "before-sidecar":
                interrupt.tick()
                return real_write_json(path, obj)
            with outputs.atomic_write(path) as temp_path:  # the real writer, interrupted half way
                temp_path.write_text(json.dumps(obj)[:50])
                interrupt.tick()
                temp_path.write_text(json.dumps(obj))

        monkeypatch.setattr(pipeline, "write_json", write_json)
    else:
        raise ValueError(stage)



@pytest.fixture
def light_meta(tmp_path, models):
    """3 light samples (one small image, a few hidden-state tokens each), sorted ids."""
    from PIL import Image

    from bindweave.io.inputs import save_hidden_states

    Image.new("RGB", (80, 60), (200, 120, 40)).save(tmp_path / "ref.png")
    generator = torch.Generator().manual_seed(0)
    entries = {}
    for index in range(3):
        save_hidden_states(tmp_path / f"h{index}.safetensors", torch.randn(1, 6, models.hidden_dim, generator=generator),
                           torch.randn(1, 8, models.hidden_dim, generator=generator), {})
        entries[f"s{index}"] = {"img_paths": ["ref.png"], "prompt": f"sample {index}", "seed": index,
                                "hidden_states_path": f"h{index}.safetensors"}
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(entries))
    return meta


@pytest.mark.parametrize("stage", ["conditioning", "denoising", "decoding",
                                   "mp4-write",
                                   "before-sidecar", "sidecar-write"])
def test_interrupted_at_any_stage_leaves_no_partial_output_and_rerun_completes_the_rest(
        models, light_meta, tmp_path, monkeypatch, stage):
    ids = ["s0", "s1", "s2"]
    output = tmp_path / "out"
    settings = RunSettings(meta_path=light_meta, image_root=None, output_dir=output, progress=False)
    sampler = SamplerSettings(num_steps=2)

    _patch_stage(stage, models, monkeypatch, interrupt_on_sample=2)
    with pytest.raises(KeyboardInterrupt):
        run_batch_on(models, settings, VIDEO, sampler)
    monkeypatch.undo()
    import gc

    gc.collect()  # whatever the interrupted frames still held is released, as when a process exits
    time.sleep(0.5)

    assert finished(output) == {ids[0]}
    left = {p.name for p in output.iterdir() if not p.name.startswith(".")}
    # A finished sample: its MP4, its latents and, last, its sidecar; interrupted before the sidecar,
    # the next one has the first two.
    expected = {f"{ids[0]}.mp4", f"{ids[0]}.latents.safetensors", f"{ids[0]}.json"} | (
        {f"{ids[1]}.mp4", f"{ids[1]}.latents.safetensors"} if stage in ("before-sidecar", "sidecar-write") else set())
    assert left == expected, left
    assert assert_no_partial_output(output) == []  # and the temp files were removed on the way out

    sidecar_mtime = (output / f"{ids[0]}.json").stat().st_mtime_ns
    summary = run_batch_on(models, settings, VIDEO, sampler)
    assert summary["skipped"] == [ids[0]] and summary["done"] == ids[1:], summary
    assert (output / f"{ids[0]}.json").stat().st_mtime_ns == sidecar_mtime
    assert finished(output) == set(ids) and assert_no_partial_output(output) == []


# --------------------------------------------------------------------------------------------
# SIGTERM (scancel, requeue, preemption, torchrun stopping the other ranks) during the MP4 write


SLOW_WRITER = textwrap.dedent("""
    # Runs launch/generate.py with a slow MP4 writer (1 s per frame) so a signal can land mid-write.
    import runpy, sys, time
    import imageio.v2 as iio

    real_get_writer = iio.get_writer

    def get_writer(*args, **kwargs):
        writer = real_get_writer(*args, **kwargs)
        real_append = writer.append_data

        def append_data(frame, *rest):
            print("WRITING FRAME", flush=True)
            time.sleep(1)
            return real_append(frame, *rest)

        writer.append_data = append_data
        return writer

    iio.get_writer = get_writer
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.mark.timeout(300)
def test_sigterm_during_the_mp4_write_leaves_no_partial_or_temp_file(work, tmp_path):
    wrapper = tmp_path / "slow_writer.py"
    wrapper.write_text(SLOW_WRITER)
    output = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(wrapper), str(REPO / "launch/generate.py"), *TINY,
                                "sampler.num_steps=2", "progress=false", f"data.meta_path={meta_path(work)}",
                                f"output_dir={output}"], cwd=work, env=plain_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        loaded = False  # the check before loading writes a 2-frame clip to a temp folder first
        for line in process.stdout:
            loaded = loaded or "attention kernels:" in line
            if loaded and "WRITING FRAME" in line:
                break
        time.sleep(1.5)  # two frames into the first video
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    assert finished(output) == set()
    assert not list(output.glob("[!.]*.mp4"))
    assert assert_no_partial_output(output) == []


# --------------------------------------------------------------------------------------------
# a disk that fills up in the middle of a run


def test_disk_full_mid_run_names_the_video_keeps_the_finished_samples_and_the_rerun_completes(
        models, light_meta, small_disk, monkeypatch):
    """The output disk fills up while the 2nd sample is computed (a real tmpfs, filled for real): the
    error names that sample's MP4, no truncated MP4 or temp file is left, the 1st sample is kept
    whole, and once space is freed the re-run makes exactly the missing samples."""
    import errno

    import bindweave.stages.phases as pipeline
    from bindweave.errors import BindWeaveInputError

    output = small_disk / "out"
    filler = small_disk / "filler"
    real_prepare = pipeline.prepare_inputs

    def prepare_inputs(models, sample, video):
        if sample.sample_id == "s1":  # fill the disk to the last byte
            with open(filler, "wb", buffering=0) as file:
                try:
                    while True:
                        file.write(bytes(4096))
                except OSError as error:
                    assert error.errno == errno.ENOSPC
        return real_prepare(models, sample, video)

    monkeypatch.setattr(pipeline, "prepare_inputs", prepare_inputs)
    settings = RunSettings(meta_path=light_meta, image_root=None, output_dir=output, progress=False)
    sampler = SamplerSettings(num_steps=2)
    with pytest.raises(BindWeaveInputError) as info:
        run_batch_on(models, settings, VIDEO, sampler)
    message = str(info.value)
    assert message.startswith(f"Disk full while writing {output / 's1.mp4'}: nothing was written to s1.mp4 and "
                              f"the files written before it are kept."), message
    assert sorted(os.listdir(output)) == ["s0.json", "s0.latents.safetensors", "s0.mp4"]  # nothing partial, no temp
    assert finished(output) == {"s0"} and assert_no_partial_output(output) == []

    monkeypatch.undo()
    filler.unlink()
    summary = run_batch_on(models, settings, VIDEO, sampler)
    assert summary["skipped"] == ["s0"] and summary["done"] == ["s1", "s2"], summary
    assert finished(output) == {"s0", "s1", "s2"} and assert_no_partial_output(output) == []


@pytest.mark.timeout(300)
def test_ctrl_c_prints_one_line_and_exits_130(work, tmp_path):
    output = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(REPO / "launch/generate.py"), *TINY, "sampler.num_steps=400",
                                f"data.meta_path={meta_path(work)}", f"output_dir={output}"],
                               cwd=work, env=plain_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if ": step 2/400" in line:  # denoising is under way (for seconds more)
                break
        else:
            pytest.fail("never saw denoising:\n" + "".join(lines[-30:]))
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert rest.strip().splitlines()[-1] == "interrupted; re-run the same command to resume (finished samples are kept)"
    assert "Traceback" not in rest
    assert finished(output) == set() and assert_no_partial_output(output) == []
