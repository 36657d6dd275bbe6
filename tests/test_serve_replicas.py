"""Many replicas, one queue (serve.store=postgres): two real server processes on 127.0.0.1 (A and B,
the tiny models) share one real PostgreSQL and one folder of files; any replica answers any
request, each runs what it claims, and a replica killed mid-job loses its lease to the other.

The two replicas and the database serve the whole module (each test's jobs are its own); the
SIGKILL test runs last and starts the killed replica again.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bindweave.errors import BindWeaveInputError
from postgres_server import PostgresServer
from serve_process import Server, reference_images

LEASE_S = 2.0


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return reference_images(tmp_path_factory.mktemp("references"))


@pytest.fixture(scope="module")
def replicas(postgres, tiny_models, tmp_path_factory):
    """Replicas A and B: one database (its DSN in the environment, as a password would be), one state folder."""
    folder = tmp_path_factory.mktemp("replicas")
    started = {}
    for name in ("A", "B"):
        started[name] = Server(tiny_models.bindweave.parent, folder / "shared", folder / f"{name}.log",
                               "serve.store=postgres", f"serve.lease_s={LEASE_S}",
                               "serve.queue_poll_ms=100", "serve.max_queue=32",
                               env={"BINDWEAVE_POSTGRES_DSN": postgres.dsn}, replica=name).start()
    yield started
    for server in started.values():
        if server.process.poll() is None:
            assert server.stop() in (0, 128 + signal.SIGTERM), server.log.read_text()[-4000:]


def log_lines(replicas, text: str) -> int:
    return sum(server.log.read_text().count(text) for server in replicas.values())


def test_ten_jobs_created_on_a_complete_exactly_once_across_both(replicas, images):
    a, b = replicas["A"], replicas["B"]
    created = [a.submit(images[:1], steps="3", seed=str(seed)).json()["id"] for seed in range(10)]
    jobs = {video_id: b.wait(video_id) for video_id in created}  # followed through B
    assert {job["status"] for job in jobs.values()} == {"completed"}, jobs
    assert {job["attempts"] for job in jobs.values()} == {1}
    assert {job["replica"] for job in jobs.values()} <= {"A", "B"}
    for video_id in created:
        assert log_lines(replicas, f"{video_id}: completed") == 1  # run once, by one replica
        assert (a.state_dir / "jobs" / video_id / "video.mp4").is_file()
    listed = {video["id"] for video in b.http.get("/v1/videos", params={"limit": 100}).json()["data"]}
    assert set(created) <= listed


def test_jobs_are_readable_and_deletable_through_either_replica(replicas, images):
    a, b = replicas["A"], replicas["B"]
    done = b.wait(a.submit(images[:2], steps="2", seed="5").json()["id"])
    assert done["status"] == "completed"
    through_a = a.openai().videos.download_content(done["id"]).content
    assert through_a[4:8] == b"ftyp" and b.openai().videos.download_content(done["id"]).content == through_a
    assert b.openai().videos.delete(done["id"]).deleted is True
    assert a.http.get(f"/v1/videos/{done['id']}").status_code == 404
    assert not (a.state_dir / "jobs" / done["id"]).exists()

    # A cancel through the replica that does not run the job reaches the one that does, through the table.
    long = a.submit(images[:1], steps="800").json()["id"]
    running = a.wait(long, until=lambda job: job["status"] == "in_progress" and job["step"] >= 2)
    runner, other = (a, b) if running["replica"] == "A" else (b, a)
    assert other.http.delete(f"/v1/videos/{long}").json()["deleted"] is True
    cancelled = runner.wait(long)
    assert cancelled["status"] == "cancelled" and 0 < cancelled["step"] < 400, cancelled
    assert not (a.state_dir / "jobs" / long).exists()


def test_twenty_concurrent_submissions_spread_over_both(replicas, images):
    servers = [replicas["A"], replicas["B"]]

    def submit(index: int) -> str:
        response = servers[index % 2].submit(images[:1], steps="20", seed=str(100 + index))
        assert response.status_code == 200, response.text
        return response.json()["id"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        created = list(pool.map(submit, range(20)))
    jobs = [servers[0].wait(video_id, timeout=120) for video_id in created]
    assert {job["status"] for job in jobs} == {"completed"} and {job["attempts"] for job in jobs} == {1}
    ran = {name: sum(job["replica"] == name for job in jobs) for name in ("A", "B")}
    assert ran["A"] > 0 and ran["B"] > 0, ran  # both replicas took jobs from the one queue
    assert sorted(job["seed"] for job in jobs) == list(range(100, 120))


def test_a_newer_schema_is_refused_with_a_clear_error(postgres, tmp_path):
    import psycopg

    from bindweave.serve.database import PostgresDatabase
    from bindweave.serve.store import SCHEMA_VERSION, JobStore

    dsn = postgres.new_database("newer_schema")
    JobStore(tmp_path, PostgresDatabase(dsn)).close()  # created at this version
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(BindWeaveInputError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this server's"):
        JobStore(tmp_path, PostgresDatabase(dsn))


def test_a_killed_replica_loses_its_job_to_the_other(replicas, images):
    """SIGKILL of the replica running a job: its lease runs out and the other replica runs the job
    again from the start (same seed: the same video), once; no second copy and no temp file stay."""
    a, b = replicas["A"], replicas["B"]
    video_id = a.submit(images[:1], steps="300", seed="21").json()["id"]
    running = a.wait(video_id, until=lambda job: job["status"] == "in_progress" and job["step"] >= 3)
    killed, survivor = (a, b) if running["replica"] == "A" else (b, a)
    assert killed.stop(signal.SIGKILL) == -signal.SIGKILL
    killed_at = time.monotonic()
    done = survivor.wait(video_id, timeout=120)
    assert (done["status"], done["attempts"], done["replica"]) == \
        ("completed", 2, "A" if survivor is a else "B"), done
    assert time.monotonic() - killed_at >= LEASE_S * 0.5  # it waited for the lease, not less
    assert "lease over" in survivor.log.read_text()
    folder = a.state_dir / "jobs" / video_id
    assert sorted(path.name for path in folder.iterdir() if path.name.startswith("video")) == \
        ["video.json", "video.latents.safetensors", "video.mp4"]
    assert not list(folder.glob(".*"))

    killed.start()  # back in the group; the same job again gives the same bytes
    again = killed.wait(killed.submit(images[:1], steps="300", seed="21").json()["id"], timeout=120)
    assert again["status"] == "completed"
    assert (a.state_dir / "jobs" / again["id"] / "video.mp4").read_bytes() == (folder / "video.mp4").read_bytes()
