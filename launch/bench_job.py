"""Full-size stage-3 job benchmark through the README's own stage-3 command (random 14B checkpoints
written to local disk first): ``python launch/bench_job.py``. The benchmark is
bindweave/testing/job_benchmark.py; settings in conf/bench_job.yaml."""

import sys
from pathlib import Path

import hydra

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.testing.job_benchmark import run_job_benchmark  # noqa: E402


@hydra.main(config_path="../conf", config_name="bench_job", version_base="1.3")
def main(cfg) -> None:
    run_job_benchmark(cfg)


if __name__ == "__main__":
    main()
