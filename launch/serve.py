"""The resident server: `python launch/serve.py [overrides]` (OpenAI-style Videos API, docs/SERVING.md).

Loads stage 3 and the Qwen2.5-VL once and serves until Ctrl-C. With no arguments it serves the tiny
CPU models on 127.0.0.1:8000 and wants an API key (`BINDWEAVE_API_KEYS=KEY`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.app.hydra_support import run_hydra_app  # noqa: E402


def command():
    """Imported once the command line is checked (run_hydra_app): a wrong setting is refused without
    loading the model libraries."""
    from bindweave.app.serve import ServeCommand

    return ServeCommand()


if __name__ == "__main__":
    run_hydra_app("serve", command)
