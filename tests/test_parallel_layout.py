"""The process layout (checked before anything starts), the presets, the launcher environment
and the sample split: all in this process, no process group."""

import os
import stat
from types import SimpleNamespace

import pytest
import torch

from bindweave.app.config import compose_config
from bindweave.errors import BindWeaveInputError
from parallel.distributed import Processes, detect_processes, rank_device
from parallel.layout import ParallelLayout, layout_from_config
from parallel.runtime import Runtime

HEADS_14B = 40


def test_ulysses_must_divide_the_heads_and_the_message_names_the_fix():
    with pytest.raises(BindWeaveInputError) as caught:
        ParallelLayout(ulysses=3, data=1).validate(3, HEADS_14B, "cpu")
    message = str(caught.value)
    assert "data=1 x cfg=1 x ring=1 x ulysses=3" in message and "world size 3" in message
    assert "ulysses=3 does not divide the model's 40 attention heads" in message
    assert "[1, 2, 4, 5, 8, 10, 20, 40]" in message


def test_degrees_must_multiply_to_the_world_size():
    with pytest.raises(BindWeaveInputError) as caught:
        ParallelLayout(cfg=2, ulysses=2).validate(8, HEADS_14B, "cuda")
    message = str(caught.value)
    assert "multiply to 4 but 8 process(es) were started" in message
    assert "data*cfg*ring*ulysses = 8" in message and "parallel=auto" in message
    assert "torchrun --nproc_per_node=4" in message


@pytest.mark.parametrize("layout, device_type, expected", [
    (ParallelLayout(cfg=3), "cpu", "use cfg=1 or cfg=2"),
    (ParallelLayout(ring=2), "cpu", "parallel.ring=2 needs the xfuser backend on CUDA"),
    (ParallelLayout(ring=2, backend="deepspeed"), "cuda", "deepspeed has Ulysses only"),
    (ParallelLayout(ulysses=2, backend="xfuser"), "cpu", "parallel.backend=xfuser needs CUDA"),
    (ParallelLayout(backend="nccl"), "cpu", "is not one of auto, xfuser, deepspeed"),
    (ParallelLayout(data=0), "cpu", "parallel.data=0 must be a whole number >= 1"),
])
def test_other_invalid_layouts(layout, device_type, expected):
    with pytest.raises(BindWeaveInputError, match="invalid parallel layout") as caught:
        layout.validate(layout.world_size if layout.data else 1, HEADS_14B, device_type)
    assert expected in str(caught.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(BindWeaveInputError) as caught:
        ParallelLayout(cfg=3, ulysses=3).validate(4, HEADS_14B, "cpu")
    assert str(caught.value).count("\n  - ") == 3


@pytest.mark.parametrize("world_size, heads, expected", [
    (1, 40, ParallelLayout()),
    (2, 40, ParallelLayout(cfg=2)),
    (4, 40, ParallelLayout(cfg=2, ulysses=2)),
    (8, 40, ParallelLayout(cfg=2, ulysses=4)),
    (16, 40, ParallelLayout(cfg=2, ulysses=8)),
    (32, 40, ParallelLayout(data=2, cfg=2, ulysses=8)),
    (3, 40, ParallelLayout(data=3)),
    (6, 40, ParallelLayout(data=3, cfg=2)),
    (5, 40, ParallelLayout(ulysses=5)),
    (4, 2, ParallelLayout(cfg=2, ulysses=2)),  # the tiny DiT
    (8, 2, ParallelLayout(data=2, cfg=2, ulysses=2)),
])
def test_auto_picks_a_valid_layout(world_size, heads, expected):
    layout = ParallelLayout.auto(world_size, heads)
    assert layout == expected
    layout.validate(world_size, heads, "cpu")


def compose_parallel(*overrides):
    return compose_config("generate", list(overrides)).parallel


@pytest.mark.parametrize("preset, world_size", [
    ("single", 1), ("ulysses2", 2), ("ulysses4", 4), ("ulysses8", 8), ("cfg2", 2),
    ("cfg2_ulysses2", 4), ("cfg2_ulysses4", 8), ("data2", 2),
])
def test_presets_are_valid_layouts_of_their_size(preset, world_size):
    parallel = compose_parallel(f"parallel={preset}")
    layout = layout_from_config(parallel, world_size, HEADS_14B, "cpu")
    assert layout.world_size == world_size and parallel.timeout_s > 0


def test_the_default_preset_is_auto_and_refuses_explicit_degrees():
    assert layout_from_config(compose_parallel(), 8, HEADS_14B, "cpu") == ParallelLayout(cfg=2, ulysses=4)
    with pytest.raises(BindWeaveInputError, match="parallel=single parallel.ulysses=4"):
        layout_from_config(compose_parallel("parallel.ulysses=4"), 4, HEADS_14B, "cpu")


def test_torchrun_environment():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}  # torchrun inside a Slurm job: torchrun's variables win
    assert detect_processes(env) == Processes(rank=5, world_size=8, local_rank=1, launcher="torchrun",
                                              master_addr="node0", master_port=29500)
    assert detect_processes({**env, "LOCAL_WORLD_SIZE": "4"}).local_world_size == 4
    assert rank_device(detect_processes(env), "cuda") == torch.device("cuda", 1)
    assert rank_device(detect_processes(env), "cpu") == torch.device("cpu")


def test_no_launcher_is_one_process():
    assert detect_processes({}) == Processes()
    # The batch script itself (measured with sbatch --ntasks=2): not rank 0 of two, one process.
    assert detect_processes({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}) == Processes()


def test_srun_environment_finds_the_first_node_with_scontrol(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[3-4]" ] && printf "gpu3\\ngpu4\\n"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[3-4]", "SLURM_JOB_ID": "123"}
    processes = detect_processes(env)
    assert processes == Processes(rank=3, world_size=4, local_rank=1, launcher="srun", master_addr="gpu3",
                                  master_port=20123)
    # The step's tasks on this node (the processes sharing its host memory): "3,1", "2(x2)".
    for tasks, node, local in (("3,1", "1", 1), ("3,1", "0", 3), ("2(x2)", "1", 2), ("1(x2),4", "2", 4)):
        assert detect_processes({**env, "SLURM_STEP_TASKS_PER_NODE": tasks, "SLURM_NODEID": node}).local_world_size \
            == local
    with pytest.raises(BindWeaveInputError, match="SLURM_STEP_TASKS_PER_NODE='two'"):
        detect_processes({**env, "SLURM_STEP_TASKS_PER_NODE": "two"})
    # Exported values win (a batch script may pick a free port).
    env.update(MASTER_ADDR="login1", MASTER_PORT="31000")
    assert (detect_processes(env).master_addr, detect_processes(env).master_port) == ("login1", 31000)


def test_bad_launcher_variables_are_named():
    with pytest.raises(BindWeaveInputError, match="WORLD_SIZE='eight'"):
        detect_processes({"RANK": "0", "WORLD_SIZE": "eight"})


def test_one_process_runtime_has_every_coordinate_zero():
    runtime = Runtime.single_process(torch.device("cpu"))
    assert (runtime.data_rank, runtime.cfg_rank, runtime.sequence_rank) == (0, 0, 0)
    assert runtime.is_writer and runtime.sequence_group is None
    assert runtime.from_rank0(lambda: "plan") == "plan"


def test_samples_are_sorted_then_strided_over_the_data_groups():
    samples = [SimpleNamespace(sample_id=name) for name in ("c", "a", "e", "b", "d")]

    def share(data_rank, data):
        coordinates = SimpleNamespace(data_rank=data_rank, layout=ParallelLayout(data=data))
        return [sample.sample_id for sample in Runtime.own_samples(coordinates, samples)]

    assert share(0, 2) == ["a", "c", "e"] and share(1, 2) == ["b", "d"]
    assert share(0, 1) == ["a", "b", "c", "d", "e"]
    assert share(2, 3) == ["c"]


def test_auto_logs_its_choice_with_the_measured_reason(caplog):
    from bindweave.settings.parallel import ParallelSettings
    from parallel.layout import layout_from_config

    with caplog.at_level("INFO", logger="bindweave"):
        layout = layout_from_config(ParallelSettings(auto=True), 8, HEADS_14B, "cpu")
    assert layout == ParallelLayout(cfg=2, ulysses=4)
    (message,) = [record.getMessage() for record in caplog.records if "parallel=auto" in record.getMessage()]
    assert "on 8 processes: data=1 x cfg=2 x ring=1 x ulysses=4" in message
    assert "exchange one prediction per step" in message and "1.98x / 3.95x / 7.80x" in message


def test_the_default_backend_runs_the_chosen_kernel_and_ring_attention_takes_xfuser():
    assert ParallelLayout(ulysses=4).attention_backend("cuda") == "deepspeed"
    assert ParallelLayout(ring=2, ulysses=2).attention_backend("cuda") == "xfuser"
    assert ParallelLayout(ulysses=2, backend="xfuser").attention_backend("cuda") == "xfuser"
    assert ParallelLayout(ulysses=2).attention_backend("cpu") == "deepspeed"


@pytest.mark.parametrize("each_rank, smallest", [([24.0, 20.5, 80.0], 20.5), ([None, None], None), ([7.0], 7.0)])
def test_every_rank_plans_memory_for_the_smallest_free_gpu_memory_of_all(monkeypatch, each_rank, smallest):
    """Ranks load and stream the DiT together (one shared host buffer): a rank with more free memory
    must not pick another plan than its peers."""
    import torch.distributed as dist

    from parallel.distributed import smallest_across_ranks

    def all_gather_object(values, value):
        assert value == each_rank[0]  # this process's own value goes in
        values[:] = each_rank

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: len(each_rank))
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    assert smallest_across_ranks(each_rank[0]) == smallest
