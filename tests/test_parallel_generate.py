"""``torchrun ... launch/generate.py`` on the tiny demo (3 samples): parallel=auto for 1, 2 and 4
processes, data parallel, and a failing sample ending the job with its error printed once.

Every run is its own torchrun (gloo, CPU) with a timeout. The 1-process run is the reference;
it also writes the tiny models and the demo inputs that the other runs reuse. Runs through
tests/parallel_record_inputs.py also record, per rank, which sample files were opened and
which rank decoded.
"""

import json
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from parallel_launch import run_script

GENERATE = "launch/generate.py"
RECORD = "tests/parallel_record_inputs.py"
FAST = ["sampler.num_steps=2", "video.num_frames=5", "progress=false"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generate")


def overrides(workspace: Path, output: str) -> list[str]:
    return [f"model.tiny_root={workspace / 'tiny'}", f"model.cache_dir={workspace / 'cache'}",
            f"data.demo_dir={workspace / 'demo'}", f"output_dir={workspace / output}", *FAST]


def records(folder: Path, rank: int) -> list[tuple[str, str]]:
    path = folder / f"rank{rank}.tsv"
    lines = path.read_text().splitlines() if path.exists() else []
    return [tuple(line.split("\t", 1)) for line in lines]


def demo_meta(workspace: Path) -> dict:
    return json.loads((workspace / "demo" / "meta_with_features.json").read_text())


@pytest.fixture(scope="module")
def reference(workspace) -> Path:
    """parallel=auto on ONE process started by torchrun (no process group at all)."""
    result = run_script(GENERATE, *overrides(workspace, "one"), processes=1, timeout=400)
    # The kernel that runs at each call site, in the log and in every sidecar (model=tiny: auto -> cuDNN first).
    assert attention_kernels(workspace / "one")["self_attention"] == "SDPA, cuDNN first"
    assert "attention kernels: self_attention: SDPA, cuDNN first; cross_attention: SDPA" in result.stderr
    return workspace / "one"


def videos(folder: Path) -> dict[str, bytes]:
    return {path.stem: path.read_bytes() for path in sorted(folder.glob("*.mp4"))}


def attention_kernels(folder: Path) -> dict:
    kernels = {json.dumps(json.loads(path.read_text())["attention_kernels"]) for path in folder.glob("*.json")}
    assert len(kernels) == 1
    return json.loads(kernels.pop())


def recipe_options(folder: Path) -> dict:
    options = {json.dumps(json.loads(path.read_text())["recipe"]["model_options"]) for path in folder.glob("*.json")}
    assert len(options) == 1
    return json.loads(options.pop())


def layout_used(folder: Path) -> dict:
    layouts = {json.dumps(json.loads(path.read_text())["parallel"]) for path in folder.glob("*.json")}
    assert len(layouts) == 1
    return json.loads(layouts.pop())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_data_parallel_splits_the_samples_and_writes_the_same_files(reference, workspace):
    run_script(RECORD, workspace / "opened", "parallel=data2", *overrides(workspace, "data2"), processes=2,
               timeout=400)
    assert videos(workspace / "data2") == videos(reference) and len(videos(reference)) == 3
    meta = demo_meta(workspace)
    sample_ids = sorted(meta)
    for rank in range(2):
        own = sample_ids[rank::2]
        opened = records(workspace / "opened", rank)
        assert sorted(Path(value).stem for kind, value in opened if kind == "hidden_states") == own
        own_images = {Path(image).name for sample_id in own for image in meta[sample_id]["img_paths"]}
        assert {Path(value).name for kind, value in opened if kind == "image"} == own_images
        assert sum(kind == "decode" for kind, _ in opened) == len(own)  # each rank writes its own samples


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_auto_layout_for_two_processes_is_cfg_parallel_with_the_same_videos(reference, workspace):
    """Here with the DiT's blocks offloaded: the two processes stream them from ONE host buffer,
    which rank 0 reads from the files and rank 1 maps (bindweave/model/host_buffer.py)."""
    result = run_script(GENERATE, "model.memory=offload", *overrides(workspace, "auto2"), processes=2, timeout=400)
    assert layout_used(workspace / "auto2") == {"data": 1, "cfg": 2, "ring": 1, "ulysses": 1, "backend": "auto",
                                                "fsdp": [], "fsdp_scope": "group", "decode": "single"}
    # The offloaded weights sit at other offsets than the resident ones, and CPU GEMMs round by
    # alignment (~1e-6, tests/test_memory.py); CFG parallel alone is pinned to the one-rank latents in
    # tests/test_parallel_exactness.py.
    assert_close_videos(workspace / "auto2", reference)
    shared = re.findall(r"the DiT's blocks wait in host memory: ([\d.]+ GiB) (read from the files by this process|"
                        r"shared with process (\d+) on this machine)", result.stderr)
    assert len(shared) == 2 and shared[0][0] == shared[1][0], result.stderr[-3000:]
    assert sorted(how.split()[0] for _, how, _ in shared) == ["read", "shared"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_auto_layout_for_four_processes_composes_with_fsdp_of_dit_and_t5(reference, workspace):
    """4 processes (the tiny DiT has 2 heads): ``parallel=auto`` picks cfg=2 x ulysses=2, here with the
    DiT (sharded loading, its projections fused on the meta model) and T5 sharded over all 4. The
    same layout without FSDP is pinned to the one-rank latents in tests/test_parallel_exactness.py."""
    result = run_script(RECORD, workspace / "auto4-records", "parallel.fsdp=[dit,t5]", "model.fuse_projections=true",
                        *overrides(workspace, "auto4"), processes=4, timeout=600)
    assert layout_used(workspace / "auto4") == {"data": 1, "cfg": 2, "ring": 1, "ulysses": 2, "backend": "deepspeed",
                                                "fsdp": ["dit", "t5"], "fsdp_scope": "group", "decode": "single"}
    # Under Ulysses (deepspeed on CPU) each rank's heads run the chosen kernel: the sidecar and the log say so.
    used = "deepspeed sequence parallel (ring=1 x ulysses=2), rank-local SDPA, cuDNN first"
    assert attention_kernels(workspace / "auto4")["self_attention"] == used
    assert f"attention kernels: self_attention: {used}" in result.stderr
    assert recipe_options(workspace / "auto4")["fuse_projections"] is True
    decodes = [sum(kind == "decode" for kind, _ in records(workspace / "auto4-records", rank)) for rank in range(4)]
    assert decodes == [3, 3, 3, 3]  # every rank takes part in the decode phase; only rank 0 writes
    # Sharded matmuls differ from unsharded ones by ~5e-7 (the latents are pinned to float noise in
    # test_parallel_exactness).
    assert_close_videos(workspace / "auto4", reference)


def assert_close_videos(folder: Path, reference: Path) -> None:
    """The same videos but for float noise, which the random tiny decoder and x264 magnify in a few pixels."""
    assert sorted(videos(folder)) == sorted(videos(reference))
    for name in videos(reference):
        ours, theirs = (iio.imread(where / f"{name}.mp4").astype(int) for where in (folder, reference))
        assert np.abs(ours - theirs).mean() < 1.0, name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_bad_sample_ends_the_job_before_loading_with_its_error_printed_once(reference, workspace):
    meta = demo_meta(workspace)
    meta["demo_face_1"]["hidden_states_path"] = "hidden_states/missing.safetensors"
    broken = workspace / "demo" / "meta_broken.json"
    broken.write_text(json.dumps(meta))
    result = run_script(GENERATE, "parallel=ulysses2", f"data.meta_path={broken}", *overrides(workspace, "broken"),
                        processes=2, timeout=400, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0  # torchrun exits 1 when a rank exits 2
    assert output.count("error: demo_face_1: hidden_states_path") == 1, output[-3000:]
    assert "missing.safetensors" in output and "nothing was loaded or written" in output
    assert not (workspace / "broken").exists()  # found before loading: nothing was written


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_data_parallel_skip_with_one_groups_samples_all_bad_finishes_the_others(reference, workspace):
    """data2 + on_error=skip: rank 1's only sample is bad. It must not end rank 0's work: every good
    sample is written, failed.json names the bad one, the run exits non-zero (torchrun: 1)."""
    meta = demo_meta(workspace)
    bad_id = sorted(meta)[1]  # data rank 1's one sample (sorted ids, strided)
    meta[bad_id]["hidden_states_path"] = "hidden_states/missing.safetensors"
    half_bad = workspace / "demo" / "meta_half_bad.json"
    half_bad.write_text(json.dumps(meta))
    output = workspace / "skip-data2"
    result = run_script(GENERATE, "parallel=data2", "on_error=skip", f"data.meta_path={half_bad}",
                        *overrides(workspace, "skip-data2"), processes=2, timeout=400, check=False)
    assert result.returncode != 0
    good = sorted(set(meta) - {bad_id})
    assert sorted(videos(output)) == good, result.stderr[-3000:]
    assert {name: videos(output)[name] for name in good} == {name: videos(reference)[name] for name in good}
    failed = json.loads((output / "failed.json").read_text())
    assert list(failed) == [bad_id] and "missing.safetensors" in failed[bad_id]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_an_error_on_rank_0_alone_is_printed_once_and_stops_every_rank(workspace):
    """Rank 0 alone reads the meta file; the other ranks must stop too, quietly."""
    result = run_script(GENERATE, "parallel=cfg2", f"data.meta_path={workspace / 'no-such-meta.json'}",
                        *overrides(workspace, "no-meta"), processes=2, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("error: Meta file") == 1, output[-3000:]
    assert "RuntimeError" not in output and "Connection closed by peer" not in output  # no rank crashed on it


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_layout_that_does_not_fit_fails_before_any_weight_is_loaded(workspace):
    result = run_script(RECORD, workspace / "bad-records", "parallel=ulysses2", *overrides(workspace, "bad"),
                        processes=None, timeout=240, check=False)
    assert result.returncode == 2
    assert "the degrees multiply to 2 but 1 process(es) were started" in result.stderr
    assert "torchrun --nproc_per_node=2" in result.stderr
    assert records(workspace / "bad-records", 0) == []
