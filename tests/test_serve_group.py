"""One replica = one torchrun group: ``torchrun --nproc_per_node=2 launch/serve.py parallel=ulysses2``
(and cfg2) on the CPU (gloo) with the tiny models, called with the official ``openai`` client.

Rank 0 serves HTTP and runs the worker; each job goes to both ranks over the long-timeout channel
(bindweave/app/serve_group.py). The ulysses2 replica serves the module (parallel.timeout_s=3, so
an idle wait of more than that shows the channel, not the default group, is what idles); the
SIGKILL test starts its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from parallel_launch import run_script
from serve_process import Server, reference_images

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
TIMEOUT_S = 3


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return reference_images(tmp_path_factory.mktemp("references"))


def group_server(tiny_models, folder, layout: str) -> Server:
    return Server(tiny_models.bindweave.parent, folder / "state", folder / "server.log", f"parallel={layout}",
                  f"parallel.timeout_s={TIMEOUT_S}", launcher=TORCHRUN, replica=layout)


def stop_group(server: Server) -> None:
    """SIGTERM to torchrun, as a process manager sends it: torchrun passes it on and exits 1 whatever
    its ranks do; rank 0 drains (uvicorn's shutdown) and releases rank 1."""
    server.stop()
    assert "Application shutdown complete." in server.log.read_text(), server.log.read_text()[-4000:]


@pytest.fixture(scope="module")
def ulysses2(tiny_models, tmp_path_factory):
    server = group_server(tiny_models, tmp_path_factory.mktemp("ulysses2"), "ulysses2").start()
    yield server
    stop_group(server)


def batch_video(tiny_models, image, prompt: str, seed: int, steps: int, layout: str, folder) -> bytes:
    """The same request through the batch commands: stage 2 on a meta JSON (stage 2's own function,
    as launch/extract.py runs it), then ``torchrun --nproc_per_node=2 launch/generate.py`` on it."""
    from bindweave.encoders.qwen import load_qwen
    from bindweave.settings.qwen import QwenSettings
    from bindweave.stages.extract import ExtractSettings, run_extract

    meta = folder / "meta.json"
    meta.write_text(json.dumps({"case": {"img_paths": [str(image)], "prompt": prompt, "seed": seed}}))
    qwen = load_qwen(QwenSettings(path=str(tiny_models.qwen), device="cpu"))
    with_states = run_extract(qwen, meta, None, ExtractSettings(output_dir=folder / "stage2", progress=False))
    run_script("launch/generate.py", f"parallel={layout}", f"data.meta_path={with_states}",
               f"model.tiny_root={tiny_models.bindweave.parent}", f"model.cache_dir={folder / 'cache'}",
               f"output_dir={folder / 'videos'}", "video.height=48", "video.width=64", "video.num_frames=5",
               f"sampler.num_steps={steps}", "progress=false", processes=2, timeout=300)
    return (folder / "videos" / "case.mp4").read_bytes()


def test_the_served_video_is_the_batch_runs_on_the_same_layout(ulysses2, images, tiny_models, tmp_path):
    client = ulysses2.openai()
    with images[0].open("rb") as reference:
        video = client.videos.create(model="bindweave", prompt="a red ball rolls", input_reference=reference,
                                     size="64x48", extra_body={"num_frames": 5, "steps": 6, "seed": 7})
    video = client.videos.poll(video.id)
    assert video.status == "completed", video
    served = client.videos.download_content(video.id).content
    assert served == batch_video(tiny_models, images[0], "a red ball rolls", 7, 6, "ulysses2", tmp_path)
    sidecar = json.loads((ulysses2.state_dir / "jobs" / video.id / "video.json").read_text())
    assert (sidecar["parallel"]["ulysses"], sidecar["parallel"]["cfg"]) == (2, 1)


def test_cancel_stops_both_ranks_at_the_same_step_and_leaves_nothing(ulysses2, images):
    long = ulysses2.submit(images[:1], steps="900").json()["id"]
    ulysses2.wait(long, until=lambda job: job["phase"] == "denoise" and job["step"] >= 3)
    assert ulysses2.http.delete(f"/v1/videos/{long}").json()["deleted"] is True
    cancelled = ulysses2.wait(long)
    assert cancelled["status"] == "cancelled" and 0 < cancelled["step"] < 450, cancelled
    # Each rank logs where it stopped (the engine's JobCancelled): the same step on both.
    stops = re.findall(rf"{long}: cancelled after (\d+) of 900 steps", ulysses2.log.read_text())
    assert len(stops) == 2 and stops[0] == stops[1], stops
    assert not (ulysses2.state_dir / "jobs" / long).exists()
    assert ulysses2.wait(ulysses2.submit(images[:1], steps="2").json()["id"])["status"] == "completed"


def test_a_bad_request_fails_that_job_only_and_the_next_one_runs(ulysses2, images, tmp_path):
    from PIL import Image

    sliver = tmp_path / "sliver.png"
    Image.new("RGB", (600, 2), (200, 30, 30)).save(sliver)  # 300:1, which Qwen2.5-VL cannot take
    failed = ulysses2.wait(ulysses2.submit([sliver], steps="2").json()["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "generation_failed", failed
    assert "200:1" in failed["error"]["message"]
    assert ulysses2.wait(ulysses2.submit(images[:1], steps="2").json()["id"])["status"] == "completed"


def test_a_failure_on_rank_0_alone_fails_the_job_on_both_and_the_next_one_runs(ulysses2, images):
    """Only rank 0 writes: with the job's folder replaced by a file, its write fails (an exception,
    not a bad input) after rank 1 has finished; the ranks agree on the failure, and both take the
    next job."""
    import shutil

    doomed = ulysses2.submit(images[:1], steps="150").json()["id"]
    ulysses2.wait(doomed, until=lambda job: job["phase"] == "denoise" and job["step"] >= 2)
    folder = ulysses2.state_dir / "jobs" / doomed
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    failed = ulysses2.wait(doomed)
    assert (failed["status"], failed["error"]["code"]) == ("failed", "internal_error"), failed
    assert "rank 0: NotADirectoryError" in ulysses2.log.read_text()
    folder.unlink()
    assert ulysses2.wait(ulysses2.submit(images[:1], steps="2").json()["id"])["status"] == "completed"


def test_an_idle_replica_outlives_the_collective_timeout(ulysses2, images):
    time.sleep(TIMEOUT_S * 2)  # nothing to do: rank 1 waits on the channel, whose timeout is days
    assert ulysses2.process.poll() is None
    assert ulysses2.wait(ulysses2.submit(images[:1], steps="2").json()["id"])["status"] == "completed"


def test_cfg2_serves_the_batch_runs_video(tiny_models, images, tmp_path):
    server = group_server(tiny_models, tmp_path, "cfg2").start()
    try:
        done = server.wait(server.submit(images[:1], steps="4", seed="3").json()["id"])
        assert done["status"] == "completed", done
        served = server.openai().videos.download_content(done["id"]).content
    finally:
        stop_group(server)
    assert served == batch_video(tiny_models, images[0], "a red ball rolls", 3, 4, "cfg2", tmp_path)


def test_sigkill_of_rank_1_ends_the_replica_and_a_restart_finishes_the_queue(tiny_models, images, tmp_path):
    server = group_server(tiny_models, tmp_path, "ulysses2").start()
    running = server.submit(images[:1], steps="150", seed="4").json()["id"]
    queued = server.submit(images[:1], steps="2", seed="5").json()["id"]
    server.wait(running, until=lambda job: job["step"] >= 3)
    rank1 = int(re.search(r"rank 1 of 2 \(pid (\d+)\)", server.log.read_text()).group(1))
    os.kill(rank1, signal.SIGKILL)
    assert server.process.wait(timeout=120) != 0
    log = server.log.read_text()
    assert re.search(r"rank 0: a rank of this replica is gone .*the replica stops \(exit code 3\), "
                     rf"{running} runs again when it restarts", log), log[-4000:]

    server.start()
    try:
        jobs = {video_id: server.wait(video_id, timeout=120) for video_id in (running, queued)}
    finally:
        stop_group(server)
    assert {job["status"] for job in jobs.values()} == {"completed"}, jobs
    assert jobs[running]["attempts"] == 2
