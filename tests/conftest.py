"""Shared fixtures: the tiny model set (written once per session), the ../shared sample cases and
a real small disk."""

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OPENS2V = SHARED / "fixtures" / "opens2v"


def pytest_configure(config):
    # A suite started in the background by a non-interactive shell (`cmd &`, as CI runners and
    # nohup scripts do) has SIGINT ignored, and an ignored signal stays ignored in every process it
    # starts: the Ctrl-C tests' commands would never see theirs. A handler is reset to the default
    # in children, as a terminal's Ctrl-C finds them.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread here and in subprocesses: the tiny models gain nothing from two, and on
    a busy 2-core machine two threads per process run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)


# Tests of the real sample cases skip with this message when ../shared is not beside the repo.
needs_opens2v = pytest.mark.skipif(not OPENS2V.is_dir(),
                                   reason=f"real OpenS2V fixtures not found at {OPENS2V} (../shared)")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny model set, written once per test session (read-only for the tests)."""
    from bindweave.testing.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_dit_folder(tmp_path_factory) -> Path:
    from bindweave.testing.tiny import write_tiny_bindweave

    folder = tmp_path_factory.mktemp("tiny") / "BindWeave"
    write_tiny_bindweave(folder, seed=0)
    return folder


@pytest.fixture
def small_disk(tmp_path):
    """A real 200 KiB file system (tmpfs), mounted for the test and always unmounted after."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 200 KiB tmpfs needs root (tests/test_outputs.py injects the errors instead)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 200 KiB tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
