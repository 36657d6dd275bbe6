"""Start a script as its own process (alone, or under torchrun on the CPU) with a timeout.

Every multi-process case of the parallel tests runs this way: a broken collective hangs, and the
timeout turns that into a failure instead of a stuck suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# torchrun's variables and a developer's own Slurm allocation: a leftover one would make a plain
# run think it is a rank.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def plain_env(**extra: str) -> dict:
    """This environment without launcher or Slurm variables, one CPU thread, unbuffered output."""
    env = {name: value for name, value in os.environ.items()
           if name not in LAUNCH_VARIABLES and not name.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def run_script(script: str | Path, *args: str, processes: int | None, timeout: float,
               check: bool = True) -> subprocess.CompletedProcess:
    """``processes=None``: one plain process; N: ``torchrun --standalone --nproc_per_node=N``.

    One CPU thread per process in both cases (torchrun's default), so that float reductions run
    in the same order and 1-process references compare exactly where they should.
    """
    script = REPO / script
    launcher = [] if processes is None else ["-m", "torch.distributed.run", "--standalone",
                                             f"--nproc_per_node={processes}"]
    env = plain_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, *launcher, str(script), *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{script.name} {' '.join(map(str, args))} on {processes or 1} process(es) exited "
                    f"{result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
