"""Stage 3 entry point: `python launch/generate.py [overrides]` or `torchrun ... launch/generate.py`.

With no arguments it runs the tiny CPU demo on the built-in cases (the output is noise: the
tiny models are random). See conf/generate.yaml and the README for real runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.app.hydra_support import run_hydra_app  # noqa: E402


def command():
    """Imported once the command line is checked (run_hydra_app): a wrong setting is refused without
    loading the model libraries."""
    from bindweave.app.generate import GenerateCommand

    return GenerateCommand()


if __name__ == "__main__":
    run_hydra_app("generate", command)
