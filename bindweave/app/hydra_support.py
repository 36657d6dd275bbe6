"""Hydra glue shared by the entry points: running a command under Hydra (the check before it,
exit codes, Ctrl-C), the per-run config and log, job results and the sweep summary."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import hydra

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bindweave.errors import BindWeaveInputError

log = logging.getLogger("bindweave")


class SweepSummary(Callback):
    """One table when a multirun ends, read from each job folder's results on disk.

    Built from files rather than from in-process job returns so that it also works when the jobs
    ran elsewhere (hydra-submitit-launcher runs each job as a Slurm job in another process).
    """

    def on_multirun_end(self, config, **kwargs) -> None:
        if os.environ.get("RANK", "0") != "0":
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)) \
            if sweep_dir.is_dir() else []
        rows = [(job_overrides(job), job_status(job), str(job)) for job in jobs]
        if not rows:
            return
        header = ("job", "result", "output")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
        lines = ["sweep summary:", *("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows])]
        log.info("\n".join(lines))


def job_overrides(job: Path) -> str:
    runs = sorted((job / ".hydra" / "runs").glob("*/overrides.yaml"))
    return " ".join(OmegaConf.load(runs[-1])) if runs else "?"


def job_status(job: Path) -> str:
    """Summed over the job's data groups (each writer leaves ``.hydra/result.data<N>.json``)."""
    results = [json.loads(path.read_text()) for path in sorted((job / ".hydra").glob("result.*.json"))]
    if not results:
        return "no result (the job ended early: see its log)"
    counts = {key: sum(len(result.get(key, ())) for result in results) for key in ("done", "skipped", "failed")}
    status = f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
    exit_code = max(result.get("exit_code", 0) for result in results)
    return status if exit_code == 0 else f"{status}, exit code {exit_code}"


def save_job_result(folder: Path, data_rank: int, result: dict) -> None:
    from bindweave.io.outputs import write_json

    write_json(folder / ".hydra" / f"result.data{data_rank}.json", result)


FAILED_SAMPLES_NAME = "failed.json"


def record_failed_samples(folder: Path, failed: dict[str, str]) -> None:
    """The end of an on_error=skip run (every stage): one log record naming each failed sample and
    why, also written to ``<folder>/failed.json`` (id -> reason, atomically); removed when the run
    had no failures, so the file always describes the last run."""
    from bindweave.io.outputs import write_json

    path = folder / FAILED_SAMPLES_NAME
    if not failed:
        path.unlink(missing_ok=True)
        return
    failed = dict(sorted(failed.items()))
    write_json(path, failed)
    log.error("%d sample%s failed (on_error=skip; the others are done), listed in %s:\n%s", len(failed),
              "" if len(failed) == 1 else "s", path,
              "\n".join(f"  - {sample_id}: {reason}" for sample_id, reason in failed.items()))


def write_failed_samples(folder: Path) -> None:
    """Stage 3: :func:`record_failed_samples` of every data group's results (``.hydra/result.*.json``)."""
    from bindweave.io.outputs import video_done

    failed = {}
    for path in sorted((folder / ".hydra").glob("result.*.json")):
        failed.update(json.loads(path.read_text()).get("failed", {}))
    record_failed_samples(folder, {sample_id: reason for sample_id, reason in failed.items()  # earlier runs' too
                                   if not video_done(folder / f"{sample_id}.mp4")})


def begin_run(cfg: DictConfig, folder: Path) -> Path:
    """The start of a stage-1/2 run in its output folder (rank 0): the folder checked, the resolved
    config saved and the run's log opened in ``.hydra/runs/<stamp>/``, an older ``failed.json``
    removed (it describes the last run). Returns the run's folder."""
    run_folder = save_run_config(cfg, folder)
    log_to_file(run_folder)
    (folder / FAILED_SAMPLES_NAME).unlink(missing_ok=True)
    return run_folder


def job_output_dir(output_dir: str) -> Path:
    """``output_dir``, or in a multirun the job's own folder (Hydra's sweep subdir, config saved there)."""
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(output_dir)




def save_run_config(cfg: DictConfig, folder: Path) -> Path:
    """The resolved config beside the outputs, one folder per run (``.hydra/runs/<run stamp>/config.yaml``
    and ``overrides.yaml``), so a re-run into the same folder never rewrites what an earlier run
    saved. Written by the project rather than by Hydra, so an output folder that cannot be made is
    one clear error (see conf/generate.yaml). Returns the run's folder."""
    from bindweave.io.outputs import atomic_write, require_writable_folder

    require_writable_folder(folder)
    from bindweave.app.config import run_stamp

    run_folder = folder / ".hydra" / "runs" / run_stamp()
    with atomic_write(run_folder / "config.yaml") as temp_path:
        temp_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if HydraConfig.initialized():
        with atomic_write(run_folder / "overrides.yaml") as temp_path:
            temp_path.write_text(OmegaConf.to_yaml(list(HydraConfig.get().overrides.task)))
    return run_folder


class CommandOnFirstUse:
    """The command, imported and built by the first job and kept for the next ones of a multirun
    (a command holds its loaded models). A plain object: submitit pickles it with the Hydra task."""

    def __init__(self, load_command: Callable[[], Callable[[DictConfig], dict | int]]):
        self.load_command = load_command
        self.command = None

    def __call__(self, cfg: DictConfig) -> dict | int:
        if self.command is None:
            self.command = self.load_command()
        return self.command(cfg)


def run_hydra_app(config_name: str, load_command: Callable[[], Callable[[DictConfig], dict | int]]) -> None:
    """Run the command ``load_command()`` returns under Hydra (single run or ``-m`` multirun) and exit
    with the worst job's code.

    The command returns an exit code, or a summary dict with ``exit_code`` (and ``error``: the sweep
    table and the launcher status show them). Every job of the command line is checked first
    (bindweave/app/config.py): a problem is one ``error:`` line (rank 0) and exit code 2. The command
    is imported only when the first job starts, so that check and ``--help`` never load the model
    libraries (~2 s instead of ~9 s).
    """
    from bindweave.app.config import CONF_DIR, check_command_line, register_schemas

    register_schemas()
    if not sys.stderr.isatty():  # the libraries' progress bars too (transformers, diffusers, the hub: tqdm)
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        check_command_line(config_name, sys.argv[1:])
    except BindWeaveInputError as error:
        if process_rank() == "0":
            print(f"error: {error}", file=sys.stderr)  # logging is not set up yet: Hydra does that
        finish(2, str(error))
    logging.captureWarnings(True)
    # scancel, preemption and torchrun's teardown send SIGTERM: unwind, so temp files are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    results: list[dict] = []

    command = CommandOnFirstUse(load_command)

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig):
        try:
            result = command(cfg)
        finally:  # each job of a multirun logs to its own folder
            close_run_log_files()
        results.append(result if isinstance(result, dict) else {"exit_code": int(result)})
        return result

    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; temp files were removed on the way out
        print("interrupted; re-run the same command to resume (finished samples are kept)", file=sys.stderr)
        finish(130, "interrupted")
    worst = max(results, key=lambda result: result["exit_code"], default={"exit_code": 0})
    finish(worst["exit_code"], worst.get("error"))


def process_rank() -> str:
    return os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"


def finish(exit_code: int, error: str | None) -> None:
    """Exit; under a launcher that wants it (``BINDWEAVE_STATUS_FILE``, set by launch/slurm/common.sh),
    each rank first leaves its exit code and error in ``<file>.<rank>``: torchrun exits 1 whatever
    its ranks' codes, prints its own summary after them, and may kill the other ranks before they
    get this far, so the job script re-prints the first failing rank's error last and exits with
    its code."""
    status_file = os.environ.get("BINDWEAVE_STATUS_FILE")
    if status_file:
        line = error.splitlines()[0] if error else ""
        Path(f"{status_file}.{process_rank()}").write_text(f"{exit_code}\n{line}\n")
    sys.exit(exit_code)


class FileOnly(logging.Filter):
    """Keeps records marked ``extra={"file_only": True}`` off the console (conf/hydra/job_logging):
    an input error is printed once as its ``error:`` line and kept in the log file as a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


class RunLogFile(logging.FileHandler):
    """The run's log file; a write that fails (a full disk) turns the copy off quietly instead of
    printing logging's own traceback for every later record: the console keeps the log."""

    def handleError(self, record: logging.LogRecord) -> None:
        self.setLevel(logging.CRITICAL + 1)


def log_to_file(run_folder: Path, rank: int = 0) -> Path:
    """Copy this process's log into the run's folder (``bindweave.log``; ``bindweave.rank<N>.log`` on
    other ranks) until the job ends (:func:`run_hydra_app` closes it). Returns the file's path."""
    path = run_folder / ("bindweave.log" if rank == 0 else f"bindweave.rank{rank}.log")
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RunLogFile(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    return path


def close_run_log_files() -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, RunLogFile)]:
        root.removeHandler(handler)
        try:
            handler.close()
        except OSError:  # a full disk: the job's own error was already reported
            pass
