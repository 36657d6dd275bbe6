"""Stage 1 entry point (optional): `python launch/refine.py [overrides]`.

With no arguments it rewrites the built-in demo prompts with the tiny random Qwen2.5-VL (the
answers are gibberish). Real runs: `python launch/refine.py refiner=openai refiner.base_url=URL
refiner.model=NAME data.meta_path=META data.image_root=IMAGES`, or `refiner=local
qwen=qwen2_5_vl_7b ...`. See conf/refine.yaml.
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.refine import run_refine_command  # noqa: E402


@hydra.main(config_path="../conf", config_name="refine", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run_refine_command(cfg))


if __name__ == "__main__":
    logging.captureWarnings(True)
    main()
