"""Stage 2 entry point: `python launch/extract.py [overrides]` or `torchrun ... launch/extract.py`.

With no arguments it extracts the built-in demo cases with the tiny random Qwen2.5-VL (the states
are noise). A real run: `python launch/extract.py qwen=qwen2_5_vl_7b data.meta_path=META
data.image_root=IMAGES output_dir=features`. See conf/extract.yaml.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.app.hydra_support import run_hydra_app  # noqa: E402


def command():
    """Imported once the command line is checked (run_hydra_app): a wrong setting is refused without
    loading the model libraries."""
    from bindweave.app.extract import run_extract_command

    return run_extract_command


if __name__ == "__main__":
    run_hydra_app("extract", command)
