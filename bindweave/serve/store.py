"""The server's jobs: one table of records (SQLite or PostgreSQL) and one folder of files per job.

    store = open_store(settings, replica_id)          # the table created or upgraded (SCHEMA_VERSION)
    store.add(job_id, request, max_queue=16)          # False: the queue is full
    record = store.claim_next(lease_s=30)             # the oldest queued job, now in_progress, leased to us
    store.report(record.id, "denoise", 3, 50, 6.0, lease_s=30)   # True: its cancel was asked for
    store.settle(record.id, "completed")

Every change of a job's state is one method here, written once for both databases
(bindweave/serve/database.py holds what differs). A job belongs to the replica that claimed it
(``worker``) while its lease (``lease_expires``) is renewed; progress, renewal and the end of a
run are accepted only from that replica, so a replica that lost its lease (it hung, or another
replica already took the job over) changes nothing.

Layout under ``serve.state_dir`` (with ``serve.store=postgres``: a folder every replica mounts):
``jobs.sqlite3`` (WAL; SQLite only) and ``jobs/<id>/`` holding the uploaded references
(``reference_<i>``, the bytes as sent), then the outputs: ``video.mp4``, its sidecar ``video.json``
and ``video.latents.safetensors`` (written by the engine through bindweave.io.outputs),
``thumbnail.jpg``. Every file reaches its name complete (``atomic_write``). A record is inserted
only after its uploads are on disk, so a record never names missing inputs; a folder without a
record (a crash between the two) is removed at start-up.

Ids are ``video_`` + 32 hex digits, made here; :func:`valid_job_id` is checked before an id from a
request is looked up, and only a record's id ever names a folder.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bindweave.errors import BindWeaveInputError
from bindweave.io.outputs import atomic_write
from bindweave.serve.database import SqliteDatabase, Statements, open_database

JOB_ID = re.compile(r"video_[0-9a-f]{32}")
STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
ACTIVE = ("queued", "in_progress")
SCHEMA_VERSION = 1  # 1: the lease columns (worker, lease_expires) and the schema_version table
# A folder without a record in a shared store may be an upload another replica is writing now.
ORPHAN_AGE_S = 3600.0
TEMPORARY_FILES = ".*.tmp*"  # atomic_write's temp names


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
    worker: str | None = None  # the replica that runs it, or ran it last
    lease_expires: float | None = None

    @classmethod
    def of_row(cls, row: dict) -> JobRecord:
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

    def remove_temporaries(self) -> None:
        """What an interrupted write left (a killed process's temp files)."""
        for temp in self.folder.glob(TEMPORARY_FILES):
            temp.unlink(missing_ok=True)




class JobStore:
    """The records, in either database (thread-safe: every change is one transaction)."""

    def __init__(self, state_dir: Path, database=None, replica_id: str = "local"):
        self.state_dir = Path(state_dir)
        self.jobs_dir = self.state_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.database = database if database is not None else SqliteDatabase(self.state_dir / "jobs.sqlite3")
        self.replica_id = replica_id
        self._migrate()

    def _migrate(self) -> None:
        """Create the tables, or upgrade older ones, to SCHEMA_VERSION; a newer schema is refused.
        Replicas starting together do it once (``serialize``: the others wait, then find it done)."""
        database = self.database
        with database.transaction() as db:
            database.serialize(db)
            tables = database.tables(db)
            if "schema_version" in tables:
                found = db.rows("SELECT version FROM schema_version")[0]["version"]
            elif "jobs" in tables:
                found = 0
            else:
                found = None
            if found is not None and found > SCHEMA_VERSION:
                raise BindWeaveInputError(
                    f"the job table in {database.where} has schema version {found}, newer than this server's "
                    f"{SCHEMA_VERSION}: a newer BindWeave made it; run that version (or a newer one), or point "
                    "this one at a database of its own")
            if found is not None and found < SCHEMA_VERSION and found not in database.upgrades:
                raise BindWeaveInputError(
                    f"{database.where} has a table 'jobs' this server did not make (no schema_version table): "
                    "give the server a database of its own")
            if found == SCHEMA_VERSION:
                return
            for statement in database.create if found is None else database.upgrades[found]:
                db.run(statement)
            db.run("DELETE FROM schema_version")
            db.run("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def files(self, job_id: str) -> JobFiles:
        return JobFiles(self.jobs_dir, job_id)

    # ---- reading

    def get(self, job_id: str) -> JobRecord | None:
        rows = self.database.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRecord.of_row(rows[0]) if rows else None

    def queue_position(self, record: JobRecord) -> int | None:
        """0: next to run; None when not queued."""
        if record.status != "queued":
            return None
        return self.database.query("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued' AND seq < ?",
                                   (record.seq,))[0]["n"]

    def counts(self) -> dict[str, int]:
        found = {row["status"]: row["n"] for row in
                 self.database.query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}
        return {status: found.get(status, 0) for status in STATUSES}

    def page(self, limit: int, after: JobRecord | None, newest_first: bool) -> tuple[list[JobRecord], bool]:
        """Up to ``limit`` records after ``after`` in submission order (or its reverse); and whether more follow."""
        direction, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        where, args = (f"WHERE seq {compare} ?", (after.seq,)) if after is not None else ("", ())
        rows = self.database.query(f"SELECT * FROM jobs {where} ORDER BY seq {direction} LIMIT ?",
                                   (*args, limit + 1))
        return [JobRecord.of_row(row) for row in rows[:limit]], len(rows) > limit

    def reachable(self) -> bool:
        """Whether the database answers (``/health``)."""
        try:
            self.database.query("SELECT 1 AS one")
        except Exception:  # any driver's error: the answer is "no"
            return False
        return True

    # ---- changing

    def add(self, job_id: str, request: dict, max_queue: int) -> bool:
        """Queue a job unless ``max_queue`` jobs are already queued (checked in the same transaction,
        serialized over all replicas, so concurrent submissions never overfill it)."""
        with self.database.transaction() as db:
            self.database.serialize(db)
            if db.rows("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued'")[0]["n"] >= max_queue:
                return False
            db.run("INSERT INTO jobs (id, status, request, created_at) VALUES (?, 'queued', ?, ?)",
                   (job_id, json.dumps(request), time.time()))
            return True

    def claim_next(self, lease_s: float) -> JobRecord | None:
        """The oldest queued job, marked in_progress (one more attempt) and leased to this replica
        for ``lease_s``. Replicas claiming at once take different jobs (the database's row lock)."""
        with self.database.transaction() as db:
            rows = db.rows(f"SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
                           f"{self.database.claim_lock}")
            if not rows:
                return None
            now = time.time()
            claimed = db.rows("UPDATE jobs SET status = 'in_progress', started_at = ?, phase = 'starting', step = 0, "
                              "progress = 0, attempts = attempts + 1, worker = ?, lease_expires = ? WHERE id = ? "
                              "RETURNING *", (now, self.replica_id, now + lease_s, rows[0]["id"]))
        self.files(claimed[0]["id"]).remove_temporaries()  # a run that was interrupted mid-write
        return JobRecord.of_row(claimed[0])

    def report(self, job_id: str, phase: str, step: int, num_steps: int, percent: float,
               lease_s: float) -> bool | None:
        """Progress of this replica's job (its lease renewed): whether its cancel was asked for
        (through any replica); None when the job is no longer this replica's."""
        return self._touch(job_id, lease_s, "phase = ?, step = ?, num_steps = ?, progress = ?, ",
                           (phase, step, num_steps, percent))

    def renew(self, job_id: str, lease_s: float) -> bool | None:
        """The lease of this replica's job renewed: as :meth:`report`."""
        return self._touch(job_id, lease_s, "", ())

    def _touch(self, job_id: str, lease_s: float, changes: str, args: tuple) -> bool | None:
        with self.database.transaction() as db:
            rows = db.rows(f"UPDATE jobs SET {changes}lease_expires = ? WHERE id = ? AND worker = ? "
                           "AND status = 'in_progress' RETURNING cancel_requested",
                           (*args, time.time() + lease_s, job_id, self.replica_id))
        return bool(rows[0]["cancel_requested"]) if rows else None

    def settle(self, job_id: str, status: str, error_code: str | None = None,
               error_message: str | None = None) -> str | None:
        """The end of this replica's run: ``status`` completed, failed, cancelled, or queued (the server
        is stopping: back in the queue, the attempt not counted). A cancel asked for meanwhile wins
        (checked in the same transaction as the change). Returns the status set; None when the job
        is no longer this replica's (its lease ran out and another replica took it over)."""
        with self.database.transaction() as db:
            rows = db.rows("SELECT cancel_requested FROM jobs WHERE id = ? AND worker = ? AND status = 'in_progress'",
                           (job_id, self.replica_id))
            if not rows:
                return None
            if rows[0]["cancel_requested"] and status != "cancelled":  # asked for after its last step boundary
                status, error_code, error_message = "cancelled", "cancelled", "cancelled as it finished"
            if status == "queued":
                _requeue(db, job_id, count_attempt=False)
            else:
                _finish(db, job_id, status, error_code, error_message)
            return status

    def request_cancel(self, job_id: str) -> str | None:
        """A queued job is cancelled now; a running one is marked (the replica running it stops it
        at its next step). Returns the status it had (None: no such job). Each change is one
        conditional UPDATE, so a claim racing it on another replica either sees it cancelled or
        claims it first and gets the mark."""
        with self.database.transaction() as db:
            if _finish(db, job_id, "cancelled", "cancelled", "cancelled before it started", only_if="queued"):
                return "queued"
            db.run("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'in_progress'", (job_id,))
            rows = db.rows("SELECT status FROM jobs WHERE id = ?", (job_id,))
            return rows[0]["status"] if rows else None

    def delete(self, job_id: str) -> None:
        with self.database.transaction() as db:
            db.run("DELETE FROM jobs WHERE id = ?", (job_id,))

    def recover(self, on_interrupted: str, max_attempts: int) -> dict[str, list[str]]:
        """At start-up: the interrupted jobs handled (:meth:`take_over_interrupted`; with SQLite every
        job left in_progress, its server is gone), then the files nothing names are removed
        (folders without a record, of a cancelled job, interrupted writes' temp files; in a shared
        store only folders without a record older than ORPHAN_AGE_S, as another replica may be
        storing an upload). Returns the ids by what happened."""
        outcome = self.take_over_interrupted(on_interrupted, max_attempts, every_running=not self.database.shared)
        statuses = {row["id"]: row["status"] for row in self.database.query("SELECT id, status FROM jobs")}
        for folder in self.jobs_dir.iterdir():
            status = statuses.get(folder.name)
            if status == "cancelled" or status is None and (
                    not self.database.shared or time.time() - folder.stat().st_mtime > ORPHAN_AGE_S):
                shutil.rmtree(folder, ignore_errors=True)
            elif status is not None and not self.database.shared:
                self.files(folder.name).remove_temporaries()
        return outcome

    def take_over_interrupted(self, on_interrupted: str, max_attempts: int,
                              every_running: bool = False) -> dict[str, list[str]]:
        """The jobs whose replica stopped while they ran (their lease ran out; ``every_running``: all
        in_progress jobs, when no server can be running them) re-queued or failed
        (``on_interrupted``; failed anyway after ``max_attempts`` starts; cancelled, their files
        removed, when a cancel was asked for). Returns the ids by what happened."""
        outcome = {"requeued": [], "failed": [], "cancelled": []}
        with self.database.transaction() as db:
            self.database.serialize(db)
            rows = db.rows("SELECT * FROM jobs WHERE status = 'in_progress' AND (? = 1 OR lease_expires < ?)",
                           (int(every_running), time.time()))
            for record in map(JobRecord.of_row, rows):
                if record.cancel_requested:
                    _finish(db, record.id, "cancelled", "cancelled", "cancelled while the server running it stopped")
                    outcome["cancelled"].append(record.id)
                elif on_interrupted == "requeue" and record.attempts < max_attempts:
                    _requeue(db, record.id, count_attempt=True)
                    outcome["requeued"].append(record.id)
                else:
                    reason = (f"the server running it stopped, {record.attempts} time(s) (serve.max_attempts="
                              f"{max_attempts}): it may be what stops the server" if on_interrupted == "requeue"
                              else "the server running it stopped (serve.on_interrupted=fail): submit it again")
                    _finish(db, record.id, "failed", "interrupted", reason)
                    outcome["failed"].append(record.id)
        for job_id in outcome["cancelled"]:
            self.files(job_id).remove()
        return outcome

    def close(self) -> None:
        self.database.close()


def open_store(settings, replica_id: str) -> JobStore:
    """``serve.store``'s job table (``settings``: ServeSettings) with its files in ``serve.state_dir``."""
    state_dir = Path(settings.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    database = open_database(settings.store, state_dir, settings.postgres_dsn, settings.postgres_dsn_env)
    return JobStore(state_dir, database, replica_id)


def _finish(db: Statements, job_id: str, status: str, error_code: str | None, error_message: str | None,
            only_if: str | None = None) -> int:
    """The job ended (``only_if``: only if it has that status now); the rows changed."""
    progress = ", progress = 100" if status == "completed" else ""
    condition, args = (" AND status = ?", (only_if,)) if only_if else ("", ())
    return db.run(f"UPDATE jobs SET status = ?, finished_at = ?, error_code = ?, error_message = ?{progress} "
                  f"WHERE id = ?{condition}", (status, time.time(), error_code, error_message, job_id, *args))


def _requeue(db: Statements, job_id: str, count_attempt: bool) -> None:
    """Back to the queue in its old place (its ``seq``); ``count_attempt`` False after a clean stop."""
    db.run("UPDATE jobs SET status = 'queued', started_at = NULL, phase = NULL, step = 0, progress = 0, worker = NULL, "
           "lease_expires = NULL, attempts = attempts - ? WHERE id = ?", (0 if count_attempt else 1, job_id))
