"""The README's "Serving on every GPU, and on many machines" commands, run as written (parsed from
README.md, never copied) with the real presets (`model=bindweave_14b`, `qwen=qwen2_5_vl_7b`)
resolved offline from an HF cache of the tiny models. What changes for the CPU: 2 processes for 8
GPUs, a free port, CPU-sized request defaults, no compile; in the second, the placeholder DSN and
shared folder become the test's PostgreSQL and a temp folder. And the Kubernetes example runs
that second command.
"""

from __future__ import annotations

import json
import re
import sys

import yaml

from hf_cache import hf_env
from postgres_server import PostgresServer
from serve_process import REPO, Server, reference_images
from test_documented_commands import readme_block, tiny_hf_home  # noqa: F401  (the session fixture)

CPU_SERVE = ["video.height=48", "video.width=64", "video.num_frames=5", "sampler.num_steps=2", "model.compile=false"]
HEADING = "Serving on every GPU, and on many machines"


def documented() -> list[tuple[dict, list[str]]]:
    """Each command of the README block: (its NAME=value assignments, the rest)."""
    commands = []
    for words in readme_block(HEADING):
        env = {}
        while re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        commands.append((env, words))
    assert [words[:4] for _, words in commands] == [["torchrun", "--standalone", "--nproc_per_node=8",
                                                    "launch/serve.py"]] * 2, commands
    return commands


def on_cpu(words: list[str], **replaced: str) -> list[str]:
    """torchrun as this Python's module, 2 processes; ``replaced``: override key -> the test's value."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *words[3:]]
    for key, value in replaced.items():
        index = [i for i, word in enumerate(argv) if word.startswith(f"{key}=")]
        assert len(index) == 1, (key, argv)
        argv[index[0]] = f"{key}={value}"
    return argv


def make_a_video(server: Server, images) -> dict:
    client = server.openai()
    with images[0].open("rb") as reference:
        video = client.videos.create(model="bindweave", prompt="a red ball rolls", input_reference=reference,
                                     size="64x48", extra_body={"num_frames": 5, "steps": 2})
    video = client.videos.poll(video.id, poll_interval_ms=50)
    assert video.status == "completed", server.log.read_text()[-4000:]
    return server.job(video.id)


def stop(server: Server) -> None:
    server.stop()
    assert "Application shutdown complete." in server.log.read_text(), server.log.read_text()[-4000:]


def test_one_replica_on_every_gpu_of_a_node(tiny_hf_home, tmp_path):
    env, words = documented()[0]
    state = tmp_path / "state"
    server = Server(None, state, tmp_path / "server.log", f"serve.state_dir={state}", *CPU_SERVE,
                    command=on_cpu(words), env={**env, **hf_env(tiny_hf_home[0])}).start()
    try:
        job = make_a_video(server, reference_images(tmp_path))
    finally:
        stop(server)
    sidecar = json.loads((state / "jobs" / job["id"] / "video.json").read_text())
    assert (sidecar["parallel"]["cfg"], sidecar["parallel"]["ulysses"]) == (2, 1)  # parallel=auto on 2 ranks
    assert sidecar["models"]["dit"]["fingerprint"]


def test_replicas_sharing_a_queue_and_the_kubernetes_example(tiny_hf_home, tmp_path):
    env, words = documented()[1]
    assert env["BINDWEAVE_POSTGRES_DSN"].startswith("postgresql://")
    postgres = PostgresServer.start()
    try:
        shared = tmp_path / "shared" / "bindweave"
        server = Server(None, shared, tmp_path / "server.log", *CPU_SERVE,
                        command=on_cpu(words, **{"serve.state_dir": str(shared)}),
                        env={**env, "BINDWEAVE_POSTGRES_DSN": postgres.dsn, **hf_env(tiny_hf_home[0])}).start()
        try:
            job = make_a_video(server, reference_images(tmp_path))
        finally:
            stop(server)
        assert job["replica"] and (shared / "jobs" / job["id"] / "video.mp4").is_file()
    finally:
        postgres.stop()

    (deployment, _service) = yaml.safe_load_all((REPO / "launch" / "kubernetes" / "serve.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [*words, "serve.replica_id=$(POD_NAME)"]
    assert set(env) <= {variable["name"] for variable in container["env"]}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
