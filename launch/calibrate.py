"""Step-cache calibration: `python launch/calibrate.py [overrides]` (conf/calibrate.yaml).

Runs exact stage-3 jobs on your weights and writes the per-step statistics that speed=fastest
(MagCache / TeaCache) decides with; see bindweave/app/calibrate.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.app.hydra_support import run_hydra_app  # noqa: E402


def command():
    """Imported once the command line is checked (run_hydra_app): a wrong setting is refused without
    loading the model libraries."""
    from bindweave.app.calibrate import run_calibrate_command

    return run_calibrate_command


if __name__ == "__main__":
    run_hydra_app("calibrate", command)
