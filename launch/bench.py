"""Speed and memory of every model of a 720P BindWeave job on one GPU, with random bf16 weights.

    python launch/bench.py                              # everything, full size (one H100: ~7 min)
    python launch/bench.py layers=10 parts=[dit]        # quick DiT iteration, scaled to 40 blocks
    python launch/bench.py layers=10 parts=[ulysses]    # the 1-8 GPU projection (sequence_benchmark.py)
    python launch/bench.py preset=tiny device=cpu       # smoke run of every code path (tests)

The benchmark itself is bindweave/testing/benchmark.py; settings in conf/bench.yaml.
"""

import logging
import sys
from pathlib import Path

import hydra

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.testing.benchmark import run_benchmark  # noqa: E402
from bindweave.testing.sequence_benchmark import run_ulysses  # noqa: E402


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg) -> None:
    run_benchmark(cfg, more_parts={"ulysses": run_ulysses})


if __name__ == "__main__":
    logging.captureWarnings(True)
    main()
