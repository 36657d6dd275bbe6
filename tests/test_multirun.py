"""Hydra multirun under torchrun: one process group, models loaded once per process, each job
identical to running it alone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bindweave.io.outputs import read_mp4_info

REPO = Path(__file__).resolve().parents[1]
SMALL = ["sampler.num_steps=2", "video.height=48", "video.width=64", "video.num_frames=5", "progress=false"]


def launch(tmp_path, processes, *overrides, stamp, multirun=False):
    env = dict(os.environ, BINDWEAVE_RUN_STAMP=stamp, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(REPO / "launch/generate.py"), *(["-m"] if multirun else []), *SMALL, *overrides]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_sweep_loads_models_once_and_matches_single_jobs(tmp_path):
    sweep = launch(tmp_path, 2, "sampler.seed=1,2", "parallel=data2", stamp="sweep", multirun=True)
    log = sweep.stdout + sweep.stderr
    # Each process loads once for both jobs.
    assert log.count("rank 0: loading stage-3 models") == 1 and log.count("rank 1: loading stage-3 models") == 1
    assert "sweep summary" in log
    for job, seed in ((0, 1), (1, 2)):
        launch(tmp_path, 2, f"sampler.seed={seed}", "parallel=data2", f"output_dir=alone{seed}", stamp=f"a{seed}")
        swept = tmp_path / "multirun/sweep" / str(job)
        assert len(list((swept / ".hydra" / "runs").glob("*/config.yaml"))) == 1
        videos = sorted(p.name for p in swept.glob("*.mp4"))
        assert len(videos) == 3
        for name in videos:
            assert (swept / name).read_bytes() == (tmp_path / f"alone{seed}" / name).read_bytes(), name
            assert read_mp4_info(swept / name)["frames"] == 5
