"""The CUDA paths (xfuser USP, deepspeed over NCCL) on GPUs: USP on one GPU is plain attention,
and N GPUs give the 1-GPU latents, padding included. Skipped without enough GPUs (CI)."""

import pytest
import torch

from parallel_launch import run_script

DENOISE = "tests/parallel_denoise.py"
DIVIDES, PADS = "1x4x8", "1x6x6"  # 40 and 45 tokens
# fp32 models; the attention kernels differ between 1 GPU (PyTorch's choice) and USP.
TOLERANCE = dict(atol=1e-4, rtol=1e-4)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpus(count):
    return pytest.mark.skipif(torch.cuda.device_count() < count, reason=f"needs {count} GPUs")


@pytest.mark.timeout(600)
def test_usp_on_one_gpu_is_plain_attention():
    run_script("tests/parallel_xfuser_attention.py", processes=1, timeout=500)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-gpu")
    run_script(DENOISE, out, "--device", "cuda", "--grid", DIVIDES, "--grid", PADS, processes=None, timeout=300)
    return {grid: torch.load(out / f"{grid}.rank0.pt") for grid in (DIVIDES, PADS)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("processes, degrees, backend, grids", [
    pytest.param(2, ["ulysses=2"], "xfuser", [DIVIDES, PADS], marks=gpus(2), id="xfuser-ulysses2"),
    pytest.param(2, ["ring=2"], "xfuser", [DIVIDES], marks=gpus(2), id="xfuser-ring2"),
    pytest.param(2, ["ulysses=2"], "deepspeed", [DIVIDES, PADS], marks=gpus(2), id="deepspeed-ulysses2"),
    pytest.param(2, ["cfg=2"], "auto", [DIVIDES, PADS], marks=gpus(2), id="cfg2"),
    pytest.param(4, ["cfg=2", "ulysses=2"], "xfuser", [DIVIDES, PADS], marks=gpus(4), id="xfuser-cfg2-ulysses2"),
    pytest.param(4, ["ulysses=4"], "xfuser", [DIVIDES, PADS], marks=gpus(4), id="xfuser-ulysses4"),
    pytest.param(4, ["ring=2", "ulysses=2"], "xfuser", [DIVIDES], marks=gpus(4), id="xfuser-ring2-ulysses2"),
])
def test_gpus_give_the_one_gpu_latents(reference, tmp_path, processes, degrees, backend, grids):
    grid_args = [arg for grid in grids for arg in ("--grid", grid)]
    run_script(DENOISE, tmp_path, *degrees, "--device", "cuda", "--backend", backend, *grid_args,
               processes=processes, timeout=500)
    for grid in grids:
        latents = [torch.load(tmp_path / f"{grid}.rank{rank}.pt") for rank in range(processes)]
        assert all(torch.equal(latents[0], other) for other in latents[1:]), grid
        torch.testing.assert_close(latents[0], reference[grid], **TOLERANCE, msg=lambda m: f"{grid}: {m}")


@gpus(2)
@pytest.mark.timeout(600)
def test_xfuser_excludes_the_padded_keys(reference, tmp_path):
    run_script(DENOISE, tmp_path, "ulysses=2", "--device", "cuda", "--backend", "xfuser", "--grid", PADS,
               "--attend-padding", processes=2, timeout=500)
    error = (torch.load(tmp_path / f"{PADS}.rank0.pt") - reference[PADS]).abs().max().item()
    assert error > 5 * TOLERANCE["atol"], f"padded keys attended, yet the latents moved only {error}"
