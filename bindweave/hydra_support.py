"""Hydra glue shared by the entry points: a run stamp every rank agrees on, and the sweep summary.

``${now:}`` is resolved by each process on its own clock, so under torchrun or srun two ranks can
disagree about the output folder by a second. ``${run_stamp:}`` is the same on every rank of a
launch, and a requeued Slurm job gets its old folder back (so it resumes there).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import hydra

from hydra.core.utils import JobStatus
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
    """Collects each job's result and prints one table when a multirun ends."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        overrides = " ".join(job_return.overrides or []) or "(defaults)"
        result = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        if isinstance(result, dict) and "done" in result:
            status = f"{len(result['done'])} done, {len(result['skipped'])} skipped, {len(result['failed'])} failed"
            where = str(result.get("output_dir", ""))
        elif isinstance(result, dict):
            status, where = f"error: {result.get('error', '')}"[:80], ""
        elif job_return.status == JobStatus.COMPLETED:
            status, where = f"exit code {result}", ""
        else:  # a failed job keeps its exception in _return_value (return_value would re-raise it)
            status, where = f"{job_return.status.name}: {job_return._return_value!r}"[:80], ""
        self.rows.append((overrides, status, where))

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.rows or os.environ.get("RANK", "0") != "0":
            return
        widths = [max(len(row[i]) for row in self.rows + [("job", "result", "output")]) for i in range(3)]
        lines = ["sweep summary:", "  ".join(h.ljust(w) for h, w in zip(("job", "result", "output"), widths))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in self.rows]
        log.info("\n".join(lines))


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def save_run_config(cfg: DictConfig, folder: Path) -> None:
    """The resolved config beside the outputs (``.hydra/config.yaml``), written by the project rather
    than by Hydra, so an output folder that cannot be made is one clear error (see conf/generate.yaml)."""
    from bindweave.outputs import atomic_write, require_writable_folder

    require_writable_folder(folder)
    with atomic_write(folder / ".hydra" / "config.yaml") as temp_path:
        temp_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def run_hydra_app(config_name: str, command: Callable[[DictConfig], dict | int]) -> None:
    """Run ``command`` under Hydra (single run or ``-m`` multirun) and exit with the worst job's code.

    ``command`` returns an exit code, or a summary dict with ``exit_code`` (the sweep table shows it).
    """
    register_resolvers()
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
