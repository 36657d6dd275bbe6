"""N ranks give the 1-rank result: Ulysses, CFG parallel and both, for token counts that divide
the sequence group and ones that need padding; and the padding mask is what makes that true.

Each case is its own torchrun (gloo, CPU) running tests/parallel_denoise.py: a seeded tiny DiT,
fixed inputs, a few UniPC steps with CFG; the final latents of every rank are compared with
the 1-process run of the same script.
"""

import sys

import pytest
import torch

from parallel_launch import REPO, run_script
from slurm_cluster import slurm  # noqa: F401  (the session fixture: a real single-node Slurm)

DENOISE = "tests/parallel_denoise.py"
DIVIDES, PADS = "1x4x8", "1x6x6"  # 40 and 45 tokens: 45 is a multiple of neither 2 nor 4
# Ulysses changes only the order of float sums (measured: about 2e-6 on latents of size ~4).
TOLERANCE = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process")
    run_script(DENOISE, out, "--grid", DIVIDES, "--grid", PADS, processes=None, timeout=180)
    return {grid: torch.load(out / f"{grid}.rank0.pt") for grid in (DIVIDES, PADS)}


def rank_latents(out, grid, processes):
    return [torch.load(out / f"{grid}.rank{rank}.pt") for rank in range(processes)]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("processes, degrees", [
    (2, ["ulysses=2"]),
    (4, ["ulysses=4"]),
    (4, ["cfg=2", "ulysses=2", "--fsdp"]),
], ids=["ulysses2", "ulysses4", "cfg2_ulysses2_fsdp"])
def test_n_ranks_give_the_one_rank_latents(reference, tmp_path, processes, degrees):
    """cfg=2 x ulysses=2 runs with the DiT FSDP-sharded over the 4 ranks (CFG parallel alone, and the
    4-process auto layout with FSDP, run end to end against the one-process videos in
    tests/test_parallel_generate.py).
    Each run installs the chosen single-device kernel and counts it: deepspeed's Ulysses calls it for
    each rank's heads, once per block per forward (kernel and sharding are separate choices)."""
    run_script(DENOISE, tmp_path, *degrees, "--grid", DIVIDES, "--grid", PADS, "--kernel", "efficient",
               processes=processes, timeout=300)
    blocks, forwards_per_rank = 2, 3 * 2 // (2 if "cfg=2" in degrees else 1)  # TINY layers; STEPS x CFG sides
    calls = [int((tmp_path / f"kernel_calls.rank{rank}.txt").read_text()) for rank in range(processes)]
    assert calls == [blocks * forwards_per_rank * 2] * processes  # two grids
    for grid in (DIVIDES, PADS):
        latents = rank_latents(tmp_path, grid, processes)
        # Every rank took the same scheduler steps (gathered tokens, exchanged CFG predictions).
        assert all(torch.equal(latents[0], other) for other in latents[1:]), grid
        torch.testing.assert_close(latents[0], reference[grid], **TOLERANCE, msg=lambda m: f"{grid}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_offloaded_blocks_and_the_step_cache_under_ulysses_give_the_one_rank_result(tmp_path):
    """Memory and speed options that touch the blocks keep the layout exact: each rank streams its
    own blocks from the host, and the step cache skips the same steps on every rank (its decision
    never depends on a rank's tokens), matching the 1-process cached run."""
    single = tmp_path / "single"
    run_script(DENOISE, single, "--grid", PADS, "--cache", "magcache", processes=None, timeout=180)
    run_script(DENOISE, tmp_path, "ulysses=2", "--grid", PADS, "--offload", "--cache", "magcache", processes=2,
               timeout=300)
    latents = rank_latents(tmp_path, PADS, 2)
    assert torch.equal(latents[0], latents[1])
    torch.testing.assert_close(latents[0], torch.load(single / f"{PADS}.rank0.pt"), **TOLERANCE)
    skipped = [(tmp_path / f"skipped.{PADS}.rank{rank}.txt").read_text() for rank in range(2)]
    assert skipped[0] == skipped[1] == (single / f"skipped.{PADS}.rank0.txt").read_text()
    assert "[]" not in skipped[0]  # some steps were skipped on each side


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_attending_the_padded_keys_changes_the_result(reference, tmp_path):
    """Pins the mask: the same run with padded keys attended is far off the 1-rank result."""
    run_script(DENOISE, tmp_path, "ulysses=2", "--grid", PADS, "--attend-padding", processes=2, timeout=240)
    error = (rank_latents(tmp_path, PADS, 2)[0] - reference[PADS]).abs().max().item()
    # Measured: 1.7e-3, against 2e-6 with the mask.
    assert error > 5 * TOLERANCE["atol"], f"padded keys attended, yet the latents moved only {error}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_srun_without_torchrun_gives_the_one_rank_latents(slurm, reference, tmp_path):  # noqa: F811
    """Start-up from Slurm's variables alone: rank, world and local rank from the srun task,
    MASTER_ADDR from `scontrol show hostnames`, the port from the job id."""
    slurm.command("srun", "--ntasks=2", "--cpus-per-task=1", "--kill-on-bad-exit=1",
                  f"--export=ALL,OMP_NUM_THREADS=1,PYTHONPATH={REPO}", sys.executable, str(REPO / DENOISE),
                  str(tmp_path), "ulysses=2", "--grid", PADS, cwd=REPO, timeout=240)
    latents = rank_latents(tmp_path, PADS, 2)
    assert torch.equal(latents[0], latents[1])
    torch.testing.assert_close(latents[0], reference[PADS], **TOLERANCE)
