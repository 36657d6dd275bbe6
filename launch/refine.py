"""Stage 1 entry point (optional): `python launch/refine.py [overrides]`.

With no arguments it rewrites the built-in demo prompts with the tiny random Qwen2.5-VL (the
answers are gibberish). Real runs: `python launch/refine.py refiner=openai refiner.base_url=URL
refiner.model=NAME data.meta_path=META data.image_root=IMAGES`, or `refiner=local
qwen=qwen2_5_vl_7b ...`. See conf/refine.yaml.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.app.hydra_support import run_hydra_app  # noqa: E402


def command():
    """Imported once the command line is checked (run_hydra_app): a wrong setting is refused without
    loading the model libraries."""
    from bindweave.app.refine import run_refine_command

    return run_refine_command


if __name__ == "__main__":
    run_hydra_app("refine", command)
