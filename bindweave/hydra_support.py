"""Hydra glue shared by the entry points: a run stamp every rank agrees on, and the sweep summary.

``${now:}`` is resolved by each process on its own clock, so under torchrun or srun two ranks can
disagree about the output folder by a second. ``${run_stamp:}`` is the same on every rank of a
launch, and a requeued Slurm job gets its old folder back (so it resumes there).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import hydra

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("bindweave")


def run_stamp() -> str:
    if os.environ.get("BINDWEAVE_RUN_STAMP"):
        return os.environ["BINDWEAVE_RUN_STAMP"]
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # shared by all ranks of one torchrun launch
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)


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
    path = job / ".hydra" / "overrides.yaml"
    return " ".join(OmegaConf.load(path)) if path.exists() else "?"


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
    from bindweave.outputs import write_json

    write_json(folder / ".hydra" / f"result.data{data_rank}.json", result)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def save_run_config(cfg: DictConfig, folder: Path) -> None:
    """The resolved config beside the outputs (``.hydra/config.yaml``), written by the project rather
    than by Hydra, so an output folder that cannot be made is one clear error (see conf/generate.yaml)."""
    from bindweave.outputs import atomic_write, require_writable_folder

    require_writable_folder(folder)
    with atomic_write(folder / ".hydra" / "config.yaml") as temp_path:
        temp_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if HydraConfig.initialized():
        with atomic_write(folder / ".hydra" / "overrides.yaml") as temp_path:
            temp_path.write_text(OmegaConf.to_yaml(list(HydraConfig.get().overrides.task)))


def run_hydra_app(config_name: str, command: Callable[[DictConfig], dict | int]) -> None:
    """Run ``command`` under Hydra (single run or ``-m`` multirun) and exit with the worst job's code.

    ``command`` returns an exit code, or a summary dict with ``exit_code`` (the sweep table shows it).
    """
    from bindweave.config import exit_on_bad_command_line, register_schemas

    register_schemas()
    exit_on_bad_command_line(config_name)  # every job of the command line, before Hydra runs any
    logging.captureWarnings(True)
    # scancel, preemption and torchrun's teardown send SIGTERM: unwind, so temp files are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    exit_codes: list[int] = []

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig):
        result = command(cfg)
        exit_codes.append(result["exit_code"] if isinstance(result, dict) else int(result))
        return result

    main()
    sys.exit(max(exit_codes, default=0))
