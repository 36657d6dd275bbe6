"""FSDP2 sharded loading of the tiny DiT with LoRAs merged rank by rank; rank 0 saves the gathered weights.

    torchrun --standalone --nproc_per_node=N tests/parallel_lora.py CHECKPOINT LORAS_JSON OUT_DIR

``LORAS_JSON``: ``[[path, strength], ...]``. Each rank checks the LoRAs against the meta model, loads
its shards with the projections fused and the LoRAs merged into its own rows; rank 0 writes
``OUT_DIR/merged.pt`` (every parameter's full tensor).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.model.loading import parameter_shapes  # noqa: E402
from bindweave.model.lora import LoraMerge  # noqa: E402
from bindweave.settings.lora import LoraSettings  # noqa: E402
from parallel.fsdp import load_sharded_bindweave  # noqa: E402


def main(checkpoint: Path, loras: list, out: Path) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    shapes = parameter_shapes(checkpoint)
    merge = LoraMerge.from_settings([LoraSettings(path, strength) for path, strength in loras], shapes)
    model, _ = load_sharded_bindweave(checkpoint, mesh, torch.float32, torch.device("cpu"), fuse=True, lora=merge)
    full = {name: parameter.full_tensor() for name, parameter in model.named_parameters()}
    if dist.get_rank() == 0:
        torch.save(full, out / "merged.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3]))
