"""The server's settings: ``serve.*`` (:class:`ServeSettings`). The whole schema of
``launch/serve.py`` (``ServeConfig``: these, the stage-3 settings of ``launch/generate.py`` with
``parallel``, and the Qwen settings of ``launch/extract.py``) is in bindweave/app/config.py, beside
the other entry points' schemas.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from bindweave.errors import BindWeaveInputError

AUTH_CHOICES = ("api_keys", "none")
INTERRUPTED_CHOICES = ("requeue", "fail")
STORE_CHOICES = ("sqlite", "postgres")
DRAIN_CHOICES = ("requeue", "finish")
# auth=none is allowed only where no other machine can connect.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """``serve.*``: where the server listens, who may call it, where it keeps its jobs, its limits."""

    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: str = "outputs/serve"  # jobs.sqlite3 + jobs/<id>/ (uploads, video, sidecar, thumbnail); postgres: shared by all replicas
    store: str = "sqlite"  # sqlite: one server, the table in state_dir | postgres: replicas share one queue
    postgres_dsn: str | None = None  # postgresql://USER:PASSWORD@HOST:5432/DB; None: read from postgres_dsn_env
    postgres_dsn_env: str = "BINDWEAVE_POSTGRES_DSN"  # the variable holding the DSN (keeps a password off argv)
    replica_id: str | None = None  # names this replica in the table and the log; None: HOST-PID
    lease_s: float = 30.0  # a running job's lease, renewed every third of it; past it another replica re-runs the job
    queue_poll_ms: int = 1000  # how often an idle worker looks at the table (jobs queued by other replicas, leases run out)
    auth: str = "api_keys"  # api_keys: a bearer token from the file or the variable below | none (loopback host only)
    api_keys_file: str | None = None  # one key per line; blank lines and '#' comments ignored
    api_keys_env: str = "BINDWEAVE_API_KEYS"  # the variable holding comma-separated keys
    model_name: str = "bindweave"  # the one model id of /v1/models, and what requests may name
    max_queue: int = 16  # queued jobs (the running one not counted); more: 429
    max_upload_bytes: int = 20 * 2**20  # per reference image
    max_image_pixels: int = 4096 * 4096  # per reference image, read from its header before decoding
    max_video_pixels: int = 1280 * 720  # width x height of a requested video
    max_frames: int = 81
    max_steps: int = 100
    on_interrupted: str = "requeue"  # a job running when the server died: requeue (same seed, same video) | fail
    max_attempts: int = 2  # starts of one job after which an interrupted job fails instead (a crash loop)
    poll_after_ms: int = 1000  # the openai client's poll interval (openai-poll-after-ms header)
    drain: str = "requeue"  # on SIGTERM: requeue (stop the running job at its next step, back in the queue) | finish
    drain_timeout_s: float = 600.0  # drain=finish: how long the running job may take; after it, it is re-queued
    callbacks: bool = False  # whether a request may give callback_url (this server then POSTs to URLs its clients name)
    callback_attempts: int = 5  # deliveries tried per job, waiting 1, 2, 4, ... s between them
    callback_timeout_s: float = 10.0  # per delivery
    callback_secret_env: str = "BINDWEAVE_CALLBACK_SECRET"  # if set: X-BindWeave-Signature, HMAC-SHA256 of the body

    def __post_init__(self):
        problems = []
        if self.auth not in AUTH_CHOICES:
            problems.append(f"serve.auth={self.auth} is not one of {', '.join(AUTH_CHOICES)}")
        elif self.auth == "none" and self.host not in LOOPBACK_HOSTS:
            problems.append(f"serve.auth=none with serve.host={self.host}: without API keys the server may only "
                            f"listen on this machine ({', '.join(LOOPBACK_HOSTS)}); set serve.auth=api_keys and give "
                            f"keys ({self.api_keys_env}=KEY or serve.api_keys_file=FILE), or serve.host=127.0.0.1")
        if self.store not in STORE_CHOICES:
            problems.append(f"serve.store={self.store} is not one of {', '.join(STORE_CHOICES)}")
        if not self.lease_s > 0:
            problems.append(f"serve.lease_s={self.lease_s} must be above 0")
        if self.drain not in DRAIN_CHOICES:
            problems.append(f"serve.drain={self.drain} is not one of {', '.join(DRAIN_CHOICES)}")
        for name in ("drain_timeout_s", "callback_timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"serve.{name}={getattr(self, name)} must be above 0")
        if self.on_interrupted not in INTERRUPTED_CHOICES:
            problems.append(f"serve.on_interrupted={self.on_interrupted} is not one of "
                            f"{', '.join(INTERRUPTED_CHOICES)}")
        if not 1 <= self.port <= 65535:
            problems.append(f"serve.port={self.port} must be 1..65535")
        for name in ("max_queue", "max_upload_bytes", "max_image_pixels", "max_video_pixels", "max_frames",
                     "max_steps", "max_attempts", "poll_after_ms", "queue_poll_ms", "callback_attempts"):
            if getattr(self, name) < 1:
                problems.append(f"serve.{name}={getattr(self, name)} must be >= 1")
        if problems:
            raise BindWeaveInputError("; ".join(problems))

    def replica_name(self) -> str:
        """``replica_id``, or this host and process."""
        return self.replica_id or f"{socket.gethostname()}-{os.getpid()}"
