"""Completion webhooks: a job submitted with ``callback_url`` is POSTed there, as its video object
(JSON, what ``GET /v1/videos/{id}`` answers), once it has ended (completed, failed or cancelled).

    callbacks = Callbacks(describe, settings)      # describe(job_id) -> the video object, or None
    callbacks.start()
    callbacks.job_ended(record)                    # from the worker, after the table says so
    callbacks.stop(timeout_s)

Deliveries run on their own thread, so a slow receiver never holds up the next job. A delivery is
retried ``serve.callback_attempts`` times with doubling waits (1 s, 2 s, 4 s, ...) on a connection
error, a timeout or an answer of 408, 429 or 5xx; any other answer ends it. The body carries the
header ``X-BindWeave-Event: video.completed`` (or ``.failed``/``.cancelled``) and, where
``serve.callback_secret_env`` names a set variable, ``X-BindWeave-Signature: sha256=<hex>``, the
HMAC-SHA256 of the body with that secret, so the receiver can tell the call came from this server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import threading
from collections.abc import Callable

import httpx2

from bindweave.serve.settings import ServeSettings
from bindweave.serve.store import JobRecord

log = logging.getLogger("bindweave")

RETRY_STATUSES = (408, 429)
FIRST_WAIT_S = 1.0


class Callbacks:
    def __init__(self, describe: Callable[[str], dict | None], settings: ServeSettings):
        self.describe, self.settings = describe, settings
        secret = os.environ.get(settings.callback_secret_env, "")
        self._secret = secret.encode() if secret else None
        self._pending: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._deliver_all, name="bindweave-callbacks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def job_ended(self, record: JobRecord) -> None:
        url = record.request.get("callback_url")
        if url:
            self._pending.put((record.id, url))

    def stop(self, timeout_s: float) -> None:
        """Deliver what is pending for up to ``timeout_s``; what is left is dropped (logged)."""
        self._pending.put(None)
        self._thread.join(timeout_s)
        self._stopping.set()

    def _deliver_all(self) -> None:
        with httpx2.Client(timeout=self.settings.callback_timeout_s, follow_redirects=False) as client:
            while (item := self._pending.get()) is not None:
                self._deliver(client, *item)

    def _deliver(self, client: httpx2.Client, job_id: str, url: str) -> None:
        video = self.describe(job_id)
        if video is None:  # deleted meanwhile
            return
        body = json.dumps(video).encode()
        headers = {"Content-Type": "application/json", "X-BindWeave-Event": f"video.{video['status']}"}
        if self._secret is not None:
            headers["X-BindWeave-Signature"] = "sha256=" + hmac.new(self._secret, body, hashlib.sha256).hexdigest()
        wait = FIRST_WAIT_S
        for attempt in range(1, self.settings.callback_attempts + 1):
            try:
                answer = client.post(url, content=body, headers=headers)
                if answer.status_code < 300:
                    log.info("%s: callback delivered to %s (attempt %d)", job_id, url, attempt)
                    return
                problem = f"HTTP {answer.status_code}"
                if answer.status_code < 500 and answer.status_code not in RETRY_STATUSES:
                    log.warning("%s: callback to %s refused (%s): not retried", job_id, url, problem)
                    return
            except httpx2.HTTPError as error:  # refused, unreachable, timed out
                problem = f"{type(error).__name__}: {error}"
            if attempt == self.settings.callback_attempts:
                break
            log.info("%s: callback to %s failed (%s); retrying in %.0f s", job_id, url, problem, wait)
            if self._stopping.wait(wait):
                break
            wait *= 2
        log.warning("%s: callback to %s not delivered after %d attempts (last: %s)", job_id, url,
                    self.settings.callback_attempts, problem)
