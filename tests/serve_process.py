"""A resident server (launch/serve.py) started as its own process with the tiny models, its log in a
file; called with raw HTTP or the official ``openai`` client. Used by tests/test_serve.py (one
server), tests/test_serve_replicas.py (replicas sharing PostgreSQL) and tests/test_serve_group.py
(a torchrun group).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import numpy as np
import pytest
from PIL import Image

from parallel_launch import plain_env

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
SMALL = {"size": "64x48", "num_frames": "5"}
MAX_QUEUE = 4
MAX_UPLOAD = 200_000
FINISHED = ("completed", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``python launch/serve.py`` with the tiny models, its log in a file."""

    def __init__(self, tiny_root: Path | None, state_dir: Path, log: Path, *overrides: str, env: dict | None = None,
                 launcher: tuple[str, ...] = (), replica: str = "local", command: list[str] | None = None):
        """``launcher``: what runs launch/serve.py (e.g. ``-m torch.distributed.run ...``); ``env``: more
        variables; ``replica``: its serve.replica_id; ``command``: a documented command line (its
        ``python``/``torchrun`` resolved by the caller) instead of the tiny-model one, given a free
        port."""
        self.port = free_port()
        self.state_dir, self.log, self.replica = state_dir, log, replica
        self.env = {"BINDWEAVE_API_KEYS": KEY, **(env or {})}
        self.key = self.env["BINDWEAVE_API_KEYS"]
        if command is not None:
            self.argv = [*command, f"serve.port={self.port}", *overrides]
        else:
            self.argv = [sys.executable, *launcher, str(REPO / "launch" / "serve.py"), f"serve.port={self.port}",
                         f"serve.state_dir={state_dir}", f"model.tiny_root={tiny_root}", f"qwen.tiny_root={tiny_root}",
                         f"model.cache_dir={state_dir.parent / 'cache'}", "video.height=48", "video.width=64",
                         "video.num_frames=5", "sampler.num_steps=2", f"serve.max_queue={MAX_QUEUE}",
                         "serve.max_steps=1000", f"serve.max_upload_bytes={MAX_UPLOAD}", "serve.poll_after_ms=20",
                         f"serve.replica_id={replica}", *overrides]
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx2.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(self.argv, cwd=REPO, env=plain_env(**self.env), stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx2.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"the server did not answer within 90 s:\n{self.log.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0)

    def submit(self, images: list[Path], **fields) -> httpx2.Response:
        files = [("input_reference", (path.name, path.read_bytes(), "image/png")) for path in images]
        return self.http.post("/v1/videos", data={"prompt": "a red ball rolls", **SMALL, **fields}, files=files)

    def job(self, video_id: str) -> dict:
        response = self.http.get(f"/v1/videos/{video_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, video_id: str, until=lambda job: job["status"] in FINISHED, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(video_id)
            if until(job):
                return job
            time.sleep(0.02)
        pytest.fail(f"{video_id} did not get there within {timeout} s: {job}")


def reference_images(folder: Path) -> list[Path]:
    """Reference images of a few sizes, each its own colours."""
    paths = []
    for index, size in enumerate([(64, 64), (80, 48), (48, 96), (72, 72), (40, 40)]):
        rng = np.random.default_rng(index)
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        paths.append(folder / f"reference_{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths
