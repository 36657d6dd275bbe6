"""The server's jobs on disk: one SQLite table of records and one folder of files per job.

    store = JobStore(Path("outputs/serve"))
    store.add(record, max_queue=16)          # False: the queue is full
    record = store.claim_next()             # the oldest queued job, now in_progress
    store.finish(record.id, "completed")

Layout under ``serve.state_dir``: ``jobs.sqlite3`` (WAL) and ``jobs/<id>/`` holding the uploaded
references (``reference_<i>``, the bytes as sent), then the outputs: ``video.mp4``, its sidecar
``video.json`` and ``video.latents.safetensors`` (written by the engine through
bindweave.io.outputs), ``thumbnail.jpg``. Every file reaches its name complete (``atomic_write``).
A record is inserted only after its uploads are on disk, so a record never names missing inputs;
a folder without a record (a crash between the two) is removed at start-up.

Ids are ``video_`` + 32 hex digits, made here; :func:`valid_job_id` is checked before an id from a
request is looked up, and only a record's id ever names a folder.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bindweave.io.outputs import atomic_write

JOB_ID = re.compile(r"video_[0-9a-f]{32}")
STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
ACTIVE = ("queued", "in_progress")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order: the queue's order and the list's
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,                  -- the validated request (JSON), what the worker runs
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    phase TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    num_steps INTEGER NOT NULL DEFAULT 0,
    progress REAL NOT NULL DEFAULT 0,
    error_code TEXT,
    error_message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,    -- starts; a crash loop is stopped at serve.max_attempts
    cancel_requested INTEGER NOT NULL DEFAULT 0
)
"""


def new_job_id() -> str:
    return f"video_{secrets.token_hex(16)}"


def valid_job_id(job_id: str) -> bool:
    return JOB_ID.fullmatch(job_id) is not None


@dataclass(frozen=True)
class JobRecord:
    """One row of the table."""

    seq: int
    id: str
    status: str
    request: dict = field(repr=False)
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    phase: str | None = None
    step: int = 0
    num_steps: int = 0
    progress: float = 0.0
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    cancel_requested: bool = False

    @classmethod
    def of_row(cls, row: sqlite3.Row) -> JobRecord:
        values = dict(row)
        values["request"] = json.loads(values["request"])
        values["cancel_requested"] = bool(values["cancel_requested"])
        return cls(**values)


class JobFiles:
    """One job's folder."""

    def __init__(self, root: Path, job_id: str):
        if not valid_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        self.folder = root / job_id

    def reference(self, index: int) -> Path:
        return self.folder / f"reference_{index}"

    @property
    def video(self) -> Path:
        return self.folder / "video.mp4"

    @property
    def thumbnail(self) -> Path:
        return self.folder / "thumbnail.jpg"

    def write_reference(self, index: int, data: bytes) -> Path:
        path = self.reference(index)
        with atomic_write(path) as temp_path:
            temp_path.write_bytes(data)
        return path

    def write_thumbnail(self) -> None:
        """The video's middle frame as a JPEG (``GET .../content?variant=thumbnail``)."""
        import imageio.v2 as iio
        from PIL import Image

        with iio.get_reader(self.video, format="FFMPEG") as reader:
            frame = reader.get_data(reader.count_frames() // 2)
        with atomic_write(self.thumbnail) as temp_path:
            Image.fromarray(frame).save(temp_path, format="JPEG", quality=90)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class JobStore:
    """The records (thread-safe: one connection behind a lock; every change is one transaction)."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.jobs_dir = self.state_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.state_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a killed process
        self._db.execute(_SCHEMA)

    def files(self, job_id: str) -> JobFiles:
        return JobFiles(self.jobs_dir, job_id)

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (taken at once: the reads in it see what it will change)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- reading

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRecord.of_row(rows[0]) if rows else None

    def queue_position(self, record: JobRecord) -> int | None:
        """0: next to run; None when not queued."""
        if record.status != "queued":
            return None
        return self._query("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?", (record.seq,))[0][0]

    def counts(self) -> dict[str, int]:
        found = dict(self._query("SELECT status, COUNT(*) FROM jobs GROUP BY status"))
        return {status: found.get(status, 0) for status in STATUSES}

    def page(self, limit: int, after: JobRecord | None, newest_first: bool) -> tuple[list[JobRecord], bool]:
        """Up to ``limit`` records after ``after`` in submission order (or its reverse); and whether more follow."""
        direction, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        where, args = (f"WHERE seq {compare} ?", (after.seq,)) if after is not None else ("", ())
        rows = self._query(f"SELECT * FROM jobs {where} ORDER BY seq {direction} LIMIT ?", (*args, limit + 1))
        return [JobRecord.of_row(row) for row in rows[:limit]], len(rows) > limit

    # ---- changing

    def add(self, job_id: str, request: dict, max_queue: int) -> bool:
        """Queue a job unless ``max_queue`` jobs are already queued (checked in the same transaction,
        so concurrent submissions never overfill it)."""
        with self._writing() as db:
            if db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0] >= max_queue:
                return False
            db.execute("INSERT INTO jobs (id, status, request, created_at) VALUES (?, 'queued', ?, ?)",
                       (job_id, json.dumps(request), time.time()))
            return True

    def claim_next(self) -> JobRecord | None:
        """The oldest queued job, marked in_progress (one more attempt)."""
        with self._writing() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'in_progress', started_at = ?, phase = 'starting', step = 0, "
                       "progress = 0, attempts = attempts + 1 WHERE id = ?", (time.time(), row["id"]))
            return JobRecord.of_row(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def report(self, job_id: str, phase: str, step: int, num_steps: int, percent: float) -> None:
        with self._writing() as db:
            db.execute("UPDATE jobs SET phase = ?, step = ?, num_steps = ?, progress = ? WHERE id = ?",
                       (phase, step, num_steps, percent, job_id))

    def settle(self, job_id: str, status: str, error_code: str | None = None,
               error_message: str | None = None) -> str:
        """The end of a run: ``status`` completed, failed, cancelled, or queued (the server is stopping:
        back in the queue, the attempt not counted). A cancel asked for meanwhile wins (checked in the
        same transaction as the change). Returns the status set."""
        with self._writing() as db:
            cancel_requested = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            if cancel_requested and status != "cancelled":  # asked for after its last step boundary
                status, error_code, error_message = "cancelled", "cancelled", "cancelled as it finished"
            if status == "queued":
                _requeue(db, job_id, count_attempt=False)
            else:
                _finish(db, job_id, status, error_code, error_message)
            return status

    def request_cancel(self, job_id: str) -> str | None:
        """A queued job is cancelled now; a running one is marked (the worker stops it). Returns the
        status it had (None: no such job)."""
        with self._writing() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "queued":
                _finish(db, job_id, "cancelled", "cancelled", "cancelled before it started")
            elif row["status"] == "in_progress":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return row["status"]

    def delete(self, job_id: str) -> None:
        with self._writing() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def recover(self, on_interrupted: str, max_attempts: int) -> dict[str, list[str]]:
        """At start-up: the jobs a dead server left in_progress are re-queued or failed
        (``on_interrupted``; failed anyway after ``max_attempts`` starts; cancelled when a cancel was
        asked for); then the files nothing names are removed (folders without a record or of a
        cancelled job, interrupted writes' temp files). Returns the ids by what happened."""
        outcome = {"requeued": [], "failed": [], "cancelled": []}
        for row in self._query("SELECT * FROM jobs WHERE status = 'in_progress'"):
            record = JobRecord.of_row(row)
            with self._writing() as db:
                if record.cancel_requested:
                    _finish(db, record.id, "cancelled", "cancelled", "cancelled while the server stopped")
                    outcome["cancelled"].append(record.id)
                elif on_interrupted == "requeue" and record.attempts < max_attempts:
                    _requeue(db, record.id, count_attempt=True)
                    outcome["requeued"].append(record.id)
                else:
                    reason = (f"the server stopped while it ran, {record.attempts} time(s) (serve.max_attempts="
                              f"{max_attempts}): it may be what stops the server" if on_interrupted == "requeue"
                              else "the server stopped while it ran (serve.on_interrupted=fail): submit it again")
                    _finish(db, record.id, "failed", "interrupted", reason)
                    outcome["failed"].append(record.id)
        statuses = dict(self._query("SELECT id, status FROM jobs"))
        for folder in self.jobs_dir.iterdir():
            if statuses.get(folder.name, "cancelled") == "cancelled":
                shutil.rmtree(folder, ignore_errors=True)
            else:
                for temp in folder.glob(".*.tmp*"):  # atomic_write's temp names
                    temp.unlink(missing_ok=True)
        return outcome

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _finish(db: sqlite3.Connection, job_id: str, status: str, error_code: str | None,
            error_message: str | None) -> None:
    db.execute("UPDATE jobs SET status = ?, finished_at = ?, error_code = ?, error_message = ?, "
               "progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END WHERE id = ?",
               (status, time.time(), error_code, error_message, status, job_id))


def _requeue(db: sqlite3.Connection, job_id: str, count_attempt: bool) -> None:
    """Back to the queue in its old place (its ``seq``); ``count_attempt`` False after a clean stop."""
    db.execute("UPDATE jobs SET status = 'queued', started_at = NULL, phase = NULL, step = 0, progress = 0, "
               "attempts = attempts - ? WHERE id = ?", (0 if count_attempt else 1, job_id))
