"""The resident server (launch/serve.py, bindweave/serve/): a real server process on 127.0.0.1 with
the tiny models, called with the official ``openai`` client and with raw HTTP.

One server serves most tests (jobs of 48x64, 5 frames and a few steps take a fraction of a second
on the CPU); the restart test runs its own, killed with SIGKILL mid-job and started again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import threading
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest

from PIL import Image

from bindweave.errors import BindWeaveInputError
from bindweave.serve.settings import ServeSettings
from bindweave.serve.store import JobStore, new_job_id
from parallel_launch import plain_env  # tests/ is on sys.path
from serve_process import KEY, MAX_QUEUE, MAX_UPLOAD, REPO, SMALL, Server, reference_images

CALLBACK_SECRET = "callback-secret-0123"



@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return reference_images(tmp_path_factory.mktemp("references"))


@pytest.fixture(scope="module")
def tiny_root(tiny_models) -> Path:
    return tiny_models.bindweave.parent


@pytest.fixture(scope="module")
def server(tiny_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    running = Server(tiny_root, folder / "state", folder / "server.log", "serve.callbacks=true",
                     env={"BINDWEAVE_CALLBACK_SECRET": CALLBACK_SECRET}).start()
    yield running
    assert running.stop() in (0, 128 + signal.SIGTERM), running.log.read_text()[-4000:]


def test_the_openai_client_makes_the_batch_runs_video(server, images, tiny_models, tmp_path):
    """create -> poll (progress rises step by step) -> download: the MP4 of the batch path (stage 2
    writing its file, stage 3 reading it) for the same inputs and seed, byte for byte."""
    client = server.openai()
    with images[0].open("rb") as reference:
        video = client.videos.create(model="bindweave", prompt="a red ball rolls", input_reference=reference,
                                     size="64x48", extra_body={"num_frames": 5, "steps": 40, "seed": 7})
    assert (video.object, video.status, video.progress, video.model, video.size) == \
        ("video", "queued", 0, "bindweave", "64x48")
    assert video.id.startswith("video_") and abs(video.created_at - time.time()) < 60
    progress = []
    while video.status in ("queued", "in_progress"):
        video = client.videos.retrieve(video.id)
        progress.append(video.progress)
        time.sleep(0.01)
    assert video.status == "completed" and video.progress == 100 and video.completed_at >= video.created_at
    assert progress == sorted(progress) and any(0 < value < 100 for value in progress), progress
    content = client.videos.download_content(video.id).content
    thumbnail = client.videos.download_content(video.id, variant="thumbnail").content
    assert thumbnail[:2] == b"\xff\xd8"  # a JPEG
    assert [listed.id for listed in client.videos.list(limit=1)][0] == video.id

    assert content == batch_video(tiny_models, images[0], "a red ball rolls", seed=7, steps=40, folder=tmp_path)


def batch_video(tiny_models, image: Path, prompt: str, seed: int, steps: int, folder: Path) -> bytes:
    """The same job through the batch path, in this process: stage 2 on a meta JSON, then
    ``Stage3Engine.run`` on the sample read back from stage 2's meta JSON."""
    from bindweave.encoders.qwen import load_qwen
    from bindweave.settings.qwen import QwenSettings
    from bindweave.io.inputs import read_meta
    from bindweave.settings.sampling import SamplerSettings
    from bindweave.stages.engine import Stage3Engine
    from bindweave.stages.extract import ExtractSettings, run_extract
    from bindweave.stages.job import Stage3Job
    from support.engines import build_models
    from bindweave.settings.model import ModelSettings, VideoSettings

    meta = folder / "meta.json"
    meta.write_text(json.dumps({"case": {"img_paths": [str(image)], "prompt": prompt, "seed": seed}}))
    qwen = load_qwen(QwenSettings(path=str(tiny_models.qwen), device="cpu"))
    (sample,) = read_meta(run_extract(qwen, meta, None, ExtractSettings(output_dir=folder, progress=False)))
    models = build_models(ModelSettings(tiny_root=str(tiny_models.bindweave.parent), dtype="float32",
                                              device="cpu", cache_dir=str(folder / "cache")))
    job = Stage3Job(sample, VideoSettings(height=48, width=64, num_frames=5), SamplerSettings(num_steps=steps),
                    folder / "case.mp4")
    assert Stage3Engine(models).run(job).status == "done"
    return (folder / "case.mp4").read_bytes()


def test_three_references_in_raw_multipart(server, images):
    response = server.submit(images[:3], steps="2", seed="3")
    assert response.status_code == 200, response.text
    job = server.wait(response.json()["id"])
    assert (job["status"], job["references"], job["seed"], job["error"]) == ("completed", 3, 3, None)
    content = server.http.get(f"/v1/videos/{job['id']}/content")
    assert content.headers["content-type"] == "video/mp4" and content.content[4:8] == b"ftyp"
    spritesheet = server.http.get(f"/v1/videos/{job['id']}/content", params={"variant": "spritesheet"})
    assert spritesheet.status_code == 400 and spritesheet.json()["error"]["param"] == "variant"


def test_cancel_a_running_job_mid_denoise_and_a_queued_one(server, images):
    long = server.submit(images[:1], steps="600").json()["id"]
    following = server.submit(images[:1], steps="2").json()["id"]
    queued = server.submit(images[:1], steps="2").json()["id"]
    server.wait(long, until=lambda job: job["phase"] == "denoise" and job["step"] >= 2)
    assert server.job(queued)["status"] == "queued" and server.job(queued)["queue_position"] == 1

    deleted = server.http.delete(f"/v1/videos/{queued}").json()
    assert deleted == {"id": queued, "object": "video.deleted", "deleted": True}
    job = server.job(queued)  # listed as cancelled (a poller learns what happened), never started
    assert (job["status"], job["started_at"], job["error"]["code"]) == ("cancelled", None, "cancelled")
    assert not (server.state_dir / "jobs" / queued).exists()

    assert server.http.delete(f"/v1/videos/{long}").json()["deleted"] is True
    cancelled = server.wait(long)
    assert cancelled["status"] == "cancelled", cancelled
    assert 0 < cancelled["step"] < 300, cancelled  # stopped at a step boundary, more than half the steps left
    assert f"cancelled after {cancelled['step']} of 600 steps" in cancelled["error"]["message"]
    assert not (server.state_dir / "jobs" / long).exists()
    done = server.wait(following)
    # The next job started right after the cancel, long before the cancelled one would have finished.
    assert done["status"] == "completed" and done["started_at"] - cancelled["finished_at"] < 2.0, done
    assert server.http.get(f"/v1/videos/{long}/content").status_code == 409
    assert server.http.delete(f"/v1/videos/{long}").status_code == 200  # a second delete removes the record
    assert server.http.get(f"/v1/videos/{long}").status_code == 404


def test_twenty_concurrent_submissions_complete_or_get_429(server, images):
    def submit(index: int) -> httpx2.Response:
        return server.submit(images[:1], steps="30", seed=str(index))

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(submit, range(20)))
    assert {response.status_code for response in responses} <= {200, 429}
    accepted = [response.json()["id"] for response in responses if response.status_code == 200]
    refused = [response for response in responses if response.status_code == 429]
    assert len(set(accepted)) == len(accepted) >= MAX_QUEUE and refused, [r.status_code for r in responses]
    assert all("queue is full" in response.json()["error"]["message"] for response in refused)
    assert all(server.wait(video_id)["status"] == "completed" for video_id in accepted)
    listed = [video.id for video in server.openai().videos.list(limit=5)]  # paged, 5 at a time
    assert sorted(video_id for video_id in listed if video_id in accepted) == sorted(accepted)
    assert len(listed) == len(set(listed))
    seeds = sorted(server.job(video_id)["seed"] for video_id in accepted)
    assert len(set(seeds)) == len(seeds)  # each accepted request ran once, as sent


def bomb_png(side: int = 10_000) -> bytes:
    """A 12 KB PNG declaring side x side pixels (1-bit, all zero): 100 megapixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + side // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_a_catalogue_of_bad_requests_is_refused_and_the_server_keeps_serving(server, images, tmp_path):
    png = images[0].read_bytes()
    unknown_id = new_job_id()

    def post(fields: dict | None = None, files: list | None = None, headers: dict | None = None, **options):
        files = [("input_reference", ("a.png", png, "image/png"))] if files is None else files
        data = {"prompt": "a red ball", **SMALL, **(fields or {})}
        data = {key: value for key, value in data.items() if value is not None}
        return server.http.post("/v1/videos", data=data, files=files, headers=headers or {}, **options)

    def image(content: bytes, name: str = "a.png") -> list:
        return [("input_reference", (name, content, "image/png"))]

    no_auth = httpx2.Client(base_url=server.url, timeout=30)
    cases = {
        "no API key": (no_auth.get("/v1/videos"), 401, "missing API key", None),
        "a wrong API key": (post(headers={"Authorization": "Bearer wrong-key-0000"}), 401, "invalid API key", None),
        "not bearer": (no_auth.get("/v1/models", headers={"Authorization": f"Basic {KEY}"}), 401, "missing API key",
                       None),
        "5 images": (post(files=image(png) * 5), 400, "1 to 4 images", "input_reference"),
        "no image": (post(files=[]), 400, "1 to 4 reference images", "input_reference"),
        "a text file as image": (post(files=image(b"just some text\n", "notes.txt")), 400, "not an image",
                                 "input_reference[0]"),
        "a decompression bomb": (post(files=image(bomb_png())), 400, "too large", "input_reference[0]"),
        "an oversize upload": (post(files=image(png + bytes(MAX_UPLOAD))), 413, "serve.max_upload_bytes",
                               "input_reference[0]"),
        "a path as id": (server.http.get("/v1/videos/..%2F..%2Fstate%2Fjobs.sqlite3"), 404, "", None),
        "a dotted id": (server.http.get("/v1/videos/video_..%2Fjobs/content"), 404, "", None),
        "a bad id": (server.http.get("/v1/videos/..."), 404, "not a video id", None),
        "an unknown id": (server.http.delete(f"/v1/videos/{unknown_id}"), 404, "no video", None),
        "a bad cursor": (server.http.get("/v1/videos", params={"after": "../x"}), 400, "not a video id", "after"),
        "size not 16x": (post({"size": "65x48"}), 400, "multiples of 16", "size"),
        "size not WxH": (post({"size": "big"}), 400, "WIDTHxHEIGHT", "size"),
        "size too large": (post({"size": "4096x4096"}), 400, "serve.max_video_pixels", "size"),
        "0 steps": (post({"steps": "0"}), 400, "out of range", "steps"),
        "too many steps": (post({"steps": "5000"}), 400, "out of range", "steps"),
        "a negative seed": (post({"seed": "-1"}), 400, "out of range", "seed"),
        "a seed that is no integer": (post({"seed": "1e3"}), 400, "not an integer", "seed"),
        "frames not 4k+1": (post({"num_frames": "6"}), 400, "4k+1", "num_frames"),
        "seconds and frames": (post({"seconds": "4"}), 400, "not both", "num_frames"),
        "guidance NaN": (post({"guidance": "nan"}), 400, "guidance", "guidance"),
        "an unknown field": (post({"temperature": "0.7"}), 400, "unknown field 'temperature'", "temperature"),
        "a custom negative prompt": (post({"negative_prompt": "blurry"}), 400, "fixed negative prompts",
                                     "negative_prompt"),
        "no prompt": (post({"prompt": " "}), 400, "prompt is required", "prompt"),
        "another model": (post({"model": "sora-2"}), 400, "this server runs 'bindweave'", "model"),
        "an unknown speed": (post({"speed": "ludicrous"}), 400, "not one of exact, fast, fastest", "speed"),
        "a JSON body": (server.http.post("/v1/videos", json={"prompt": "x"}), 415, "multipart/form-data", None),
        "a body without length": (server.http.post("/v1/videos", content=iter([b"--x--\r\n"]), headers={
            "Content-Type": "multipart/form-data; boundary=x"}), 411, "Content-Length", None),
        "a callback that is no web URL": (post({"callback_url": "file:///etc/passwd"}), 400, "http:// or https://",
                                          "callback_url"),
        "content of an unknown id": (server.http.get(f"/v1/videos/{unknown_id}/content"), 404, "no video", None),
    }
    wrong = {}
    for name, (response, status, message, param) in cases.items():
        body = response.json()
        if response.status_code != status or message not in body["error"]["message"] or \
                (param is not None and body["error"]["param"] != param):
            wrong[name] = (response.status_code, body)
    assert wrong == {}
    assert len(cases) >= 15
    assert not [path for path in (server.state_dir / "jobs").iterdir()
                if server.job(path.name)["status"] == "cancelled"]  # no refused upload left a folder behind
    response = server.submit(images[:1], steps="2")
    assert server.wait(response.json()["id"])["status"] == "completed"


class CallbackListener:
    """A local HTTP endpoint that records each POST; it answers 503 to the first ``refuse`` of them."""

    def __init__(self, refuse: int):
        import http.server

        calls, listener = [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                calls.append((dict(self.headers), body))
                self.send_response(503 if len(calls) <= listener.refuse else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.calls, self.refuse = calls, refuse
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 30) -> list:
        deadline = time.monotonic() + timeout
        while len(self.calls) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.calls


def test_a_completion_webhook_is_retried_signed_and_sent_for_failures_too(server, images, tmp_path):
    listener = CallbackListener(refuse=1)
    try:
        done = server.wait(server.submit(images[:1], steps="2", callback_url=listener.url).json()["id"])
        calls = listener.wait(2)
        assert len(calls) == 2 and calls[0][1] == calls[1][1]  # refused once (503), delivered on the retry
        headers, body = calls[1]
        video = json.loads(body)
        assert (video["id"], video["status"], video["object"]) == (done["id"], "completed", "video")
        assert headers["X-BindWeave-Event"] == "video.completed"
        expected = hmac.new(CALLBACK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-BindWeave-Signature"] == f"sha256={expected}"

        sliver = tmp_path / "sliver.png"
        Image.new("RGB", (600, 2), (200, 30, 30)).save(sliver)  # 300:1, which Qwen2.5-VL cannot take
        failed = server.wait(server.submit([sliver], steps="2", callback_url=listener.url).json()["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "generation_failed"
        headers, body = listener.wait(3)[2]
        assert headers["X-BindWeave-Event"] == "video.failed" and json.loads(body)["id"] == failed["id"]
    finally:
        listener.http.shutdown()
    assert "failed (HTTP 503); retrying in 1 s" in server.log.read_text()


def test_models_health_and_metrics(server):
    assert server.openai().models.list().data[0].id == "bindweave"
    assert httpx2.get(f"{server.url}/health").json() == {"status": "ready", "replica": server.replica}  # no key needed
    text = server.http.get("/metrics").text
    assert "bindweave_queue_length 0" in text and 'bindweave_jobs{status="completed"}' in text
    step_count = next(line for line in text.splitlines() if line.startswith("bindweave_denoise_step_seconds_count"))
    assert int(step_count.split()[1]) > 0
    assert "bindweave_running_jobs 0" in text and "bindweave_jobs_taken_over_total 0" in text
    assert 'bindweave_job_failures_total{code="generation_failed"} 1' in text  # the webhook test's sliver


def test_a_killed_server_resumes_its_jobs_after_a_restart(tiny_root, images, tmp_path):
    """SIGKILL with one job running and two queued: after the restart the queued ones complete and the
    interrupted one runs again from the start (serve.on_interrupted=requeue), making the video an
    uninterrupted run makes. Then SIGTERM mid-job: the job is back in the queue, not counted as a crash."""
    server = Server(tiny_root, tmp_path / "state", tmp_path / "server.log").start()
    interrupted = server.submit(images[:2], steps="150", seed="11").json()["id"]
    queued = [server.submit(images[:1], steps="2", seed=str(seed)).json()["id"] for seed in (1, 2)]
    server.wait(interrupted, until=lambda job: job["step"] >= 2)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL

    server.start()
    jobs = {video_id: server.wait(video_id) for video_id in [interrupted, *queued]}
    assert {job["status"] for job in jobs.values()} == {"completed"}, jobs
    assert jobs[interrupted]["attempts"] == 2 and [jobs[video_id]["attempts"] for video_id in queued] == [1, 1]
    again = server.submit(images[:2], steps="150", seed="11").json()["id"]
    assert server.wait(again)["status"] == "completed"
    videos = {video_id: (server.state_dir / "jobs" / video_id / "video.mp4").read_bytes()
              for video_id in (interrupted, again)}
    assert videos[interrupted] == videos[again]
    listed = [video["id"] for video in server.http.get("/v1/videos", params={"limit": 100}).json()["data"]]
    assert sorted(listed) == sorted([interrupted, *queued, again])
    assert sorted(path.name for path in (server.state_dir / "jobs").iterdir()) == sorted(listed)
    assert not list((server.state_dir / "jobs").glob("*/.*"))  # no temp file left

    stopped = server.submit(images[:1], steps="600").json()["id"]
    server.wait(stopped, until=lambda job: job["step"] >= 2)
    assert server.stop(signal.SIGTERM) in (0, 128 + signal.SIGTERM)
    record = JobStore(server.state_dir).get(stopped)
    assert (record.status, record.attempts, record.progress) == ("queued", 0, 0)

    # serve.drain=finish: SIGTERM lets the running job finish (nothing new is accepted meanwhile), then exits.
    JobStore(server.state_dir).request_cancel(stopped)  # the queued one goes: only the new job runs below
    server.argv.append("serve.drain=finish")
    server.start()
    finishing = server.submit(images[:1], steps="150").json()["id"]
    server.wait(finishing, until=lambda job: job["status"] == "in_progress" and job["step"] >= 2)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx2.TransportError):  # the listener is closed at once
        server.http.get("/health")
    assert server.process.wait(timeout=120) in (0, 128 + signal.SIGTERM)
    record = JobStore(server.state_dir).get(finishing)
    assert (record.status, record.step, record.attempts) == ("completed", 150, 1), record
    assert (server.state_dir / "jobs" / finishing / "video.mp4").is_file()


def test_interrupted_jobs_follow_the_policy(tmp_path):
    """serve.on_interrupted=fail fails a job found in_progress; requeue stops after serve.max_attempts starts."""
    store = JobStore(tmp_path / "state")
    for index in range(2):
        store.add(new_job_id(), {"index": index}, max_queue=10)
    first = store.claim_next(lease_s=30)
    (store.jobs_dir / "orphan").mkdir()
    assert store.recover("requeue", max_attempts=2) == {"requeued": [first.id], "failed": [], "cancelled": []}
    assert not (store.jobs_dir / "orphan").exists()
    assert store.claim_next(lease_s=30).id == first.id  # back in its old place, at the head of the queue
    assert store.recover("requeue", max_attempts=2)["failed"] == [first.id]  # a second start: a crash loop
    assert "max_attempts" in store.get(first.id).error_message
    second = store.claim_next(lease_s=30)
    assert store.recover("fail", max_attempts=2)["failed"] == [second.id]
    assert store.get(second.id).error_code == "interrupted"


def test_auth_is_required_off_this_machine(tmp_path):
    with pytest.raises(BindWeaveInputError, match="may only listen on this machine"):
        ServeSettings(auth="none", host="0.0.0.0")
    from bindweave.serve.auth import load_api_keys

    with pytest.raises(BindWeaveInputError, match="no API key is set"):
        load_api_keys(ServeSettings(api_keys_env="BINDWEAVE_TEST_NO_SUCH_VARIABLE"))
    keys = tmp_path / "keys"
    keys.write_text("# ops\nkey-one-0123456789\n\n")
    assert load_api_keys(ServeSettings(api_keys_file=str(keys), api_keys_env="BINDWEAVE_TEST_NO_SUCH_VARIABLE")) == \
        (b"key-one-0123456789",)
    result = subprocess.run([sys.executable, str(REPO / "launch" / "serve.py"), "serve.auth=none",
                             "serve.host=0.0.0.0"], cwd=REPO, env=plain_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "error: serve.auth=none with serve.host=0.0.0.0"), result.stderr


def test_the_serve_config_has_the_generate_presets_and_names_typos():
    from bindweave.app.config import check_command_line, compose_config, settings_of
    from bindweave.app.config import register_schemas
    from bindweave.app.config import ServeConfig

    register_schemas()
    config = settings_of(compose_config("serve", ["model=bindweave_14b", "qwen=qwen2_5_vl_7b", "speed=fastest"]))
    assert isinstance(config, ServeConfig) and config.model.dit == "ByteDance/BindWeave"
    assert (config.cache.kind, config.model.linear_precision, config.serve.auth) == ("magcache", "auto_fp8", "api_keys")
    with pytest.raises(BindWeaveInputError, match=r"unknown setting serve.max_queu .*did you mean serve.max_queue\?"):
        check_command_line("serve", ["serve.max_queu=3"])


def test_a_table_of_the_servers_before_schema_versions_is_upgraded_in_place(tmp_path):
    """The table of the servers before schema versions (no lease columns, no version table): its jobs
    stay, the lease columns are added and the version recorded; a newer version is refused."""
    import sqlite3

    from bindweave.serve.store import SCHEMA_VERSION

    state = tmp_path / "state"
    state.mkdir()
    old = sqlite3.connect(state / "jobs.sqlite3")
    old.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT "
                "NULL, request TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL, phase TEXT, "
                "step INTEGER NOT NULL DEFAULT 0, num_steps INTEGER NOT NULL DEFAULT 0, progress REAL NOT NULL "
                "DEFAULT 0, error_code TEXT, error_message TEXT, attempts INTEGER NOT NULL DEFAULT 0, "
                "cancel_requested INTEGER NOT NULL DEFAULT 0)")
    kept = new_job_id()
    old.execute("INSERT INTO jobs (id, status, request, created_at) VALUES (?, 'queued', '{}', 1.0)", (kept,))
    old.commit()
    old.close()
    store = JobStore(state, replica_id="here")
    claimed = store.claim_next(lease_s=30)
    assert (claimed.id, claimed.worker, claimed.attempts) == (kept, "here", 1)
    assert claimed.lease_expires > time.time() + 20
    store.database.query("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    store.close()
    with pytest.raises(BindWeaveInputError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this server's"):
        JobStore(state)
