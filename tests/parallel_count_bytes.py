"""Count the bytes each rank sends in one DiT forward under deepspeed's Ulysses, and in one CFG exchange.

    torchrun --standalone --nproc_per_node=2 tests/parallel_count_bytes.py OUT_DIR --grid 3x8x12 --grid 1x6x6

The seeded tiny DiT (TINY_CONFIG, float32, gloo) runs one forward per latent grid ``FxHxW`` under
``parallel.backend=deepspeed`` with ulysses = the world size, then one CFG-parallel velocity with the
world as the CFG group. Meanwhile torch.distributed's collectives are wrapped (deepspeed.comm and
this project call them through the module, so the wrappers see every call) to add up the bytes
this rank sends to the others. Each rank writes ``OUT_DIR/bytes.rank{R}.json``:
``{"forward": {grid: {"bytes": .., "calls": {collective: count}}}, "cfg_exchange": {.., "prediction_elements": ..}}``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.model.transformer import TINY_CONFIG, BindWeaveTransformer  # noqa: E402
from bindweave.sampling.sampler import Step  # noqa: E402
from parallel.cfg import parallel_guided_velocity  # noqa: E402
from parallel.distributed import detect_processes, start_process_group, stop_process_group  # noqa: E402
from parallel.layout import ParallelLayout  # noqa: E402
from parallel.parallelize import parallelize  # noqa: E402
from parallel.runtime import Runtime  # noqa: E402
from support.dit_inputs import tiny_dit_inputs as tiny_inputs  # noqa: E402  (tests/ is the script's folder)


def _all_to_all_single(arguments, rank, size):
    data = arguments["input"]
    splits = arguments["input_split_sizes"] or [data.shape[0] // size] * size
    return data.nbytes // data.shape[0] * (data.shape[0] - splits[rank])


# Bytes this rank sends to the other ranks, from a collective's bound arguments.
SENT_BYTES = {
    "all_to_all_single": _all_to_all_single,
    "all_to_all": lambda arguments, rank, size: sum(
        tensor.nbytes for index, tensor in enumerate(arguments["input_tensor_list"]) if index != rank),
    "all_gather": lambda arguments, rank, size: arguments["tensor"].nbytes * (size - 1),
    "all_gather_into_tensor": lambda arguments, rank, size: arguments["input_tensor"].nbytes * (size - 1),
}
# Counted only: a forward must not call them (the test asserts it).
OTHER_COLLECTIVES = ("all_reduce", "broadcast", "reduce_scatter", "reduce_scatter_tensor", "send", "isend")


@contextmanager
def counting_sent_bytes():
    """Yields ``{"bytes": .., "calls": Counter}``, filled by every collective called inside."""
    record = {"bytes": 0, "calls": Counter()}
    originals = {name: getattr(dist, name) for name in (*SENT_BYTES, *OTHER_COLLECTIVES)}

    def wrapped(name, original):
        signature = inspect.signature(original)

        def collective(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs)
            arguments.apply_defaults()
            group = arguments.arguments.get("group")  # None: the world
            record["calls"][name] += 1
            if name in SENT_BYTES:
                rank, size = dist.get_rank(group), dist.get_world_size(group)
                record["bytes"] += SENT_BYTES[name](arguments.arguments, rank, size)
            return original(*args, **kwargs)

        return collective

    for name, original in originals.items():
        setattr(dist, name, wrapped(name, original))
    try:
        yield record
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--grid", action="append", required=True, help="latent FxHxW")
    args = parser.parse_args()

    processes = detect_processes()
    layout = ParallelLayout(ulysses=processes.world_size, backend="deepspeed")
    layout.validate(processes.world_size, TINY_CONFIG["num_attention_heads"], "cpu")
    start_process_group(processes, "cpu", timeout_s=120)
    try:
        torch.manual_seed(0)
        model = BindWeaveTransformer(**TINY_CONFIG).eval()
        parallelize(model, Runtime.build(layout, processes, torch.device("cpu")))
        record = {"forward": {}}
        with torch.no_grad():
            for grid in args.grid:
                frames, height, width = (int(size) for size in grid.split("x"))
                x = tiny_inputs(frames=frames, height=height, width=width)
                with counting_sent_bytes() as sent:
                    prediction = model(**x)
                record["forward"][grid] = sent
            # The CFG exchange of the last prediction, the world standing in for the CFG group.
            velocity = parallel_guided_velocity(lambda latents, step: prediction, 5.0, 2, processes.rank, None)
            with counting_sent_bytes() as sent:
                velocity(x["latents"], Step(index=0, num_steps=1, timestep=x["timestep"]))
            record["cfg_exchange"] = {**sent, "prediction_elements": prediction.numel()}
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"bytes.rank{processes.rank}.json").write_text(json.dumps(record))
    finally:
        stop_process_group()


if __name__ == "__main__":
    main()
