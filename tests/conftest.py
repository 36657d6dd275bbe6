"""Shared fixtures: the tiny model set (written once per session) and the ../shared sample cases."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OPENS2V = SHARED / "fixtures" / "opens2v"


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
    from bindweave.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_dit_folder(tmp_path_factory) -> Path:
    from bindweave.transformer import write_tiny_bindweave

    folder = tmp_path_factory.mktemp("tiny") / "BindWeave"
    write_tiny_bindweave(folder, seed=0)
    return folder
