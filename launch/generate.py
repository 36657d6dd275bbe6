"""Stage 3 entry point: `python launch/generate.py [overrides]` or `torchrun ... launch/generate.py`.

With no arguments it runs the tiny CPU demo on the built-in cases (the output is noise: the
tiny models are random). See conf/generate.yaml and the README for real runs.
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.entry import run_generate_command  # noqa: E402


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run_generate_command(cfg))


if __name__ == "__main__":
    logging.captureWarnings(True)
    main()
