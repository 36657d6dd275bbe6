"""FSDP2 sharded loading + forward of a many-shard tiny DiT checkpoint; every rank reports.

    torchrun --standalone --nproc_per_node=N tests/parallel_fsdp.py CHECKPOINT OUT_DIR [ulysses] [--speed]

Each rank loads the DiT sharded over the whole world, runs one forward (with Ulysses over
``ulysses`` ranks when given) and writes ``OUT_DIR/rank{R}.json`` (bytes it read, tensors it
materialised, its peak RSS growth, the blocks compiled) and ``OUT_DIR/rank{R}.pt`` (the velocity).
``--speed``: the projections fused at load and the speed options applied, blocks compiled with
``aot_eager`` (inductor would generate and build C++ on the CPU: slow, and nothing more to check).
"""

import argparse
import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers.models.transformers.transformer_wan  # noqa: E402,F401  (imported before RSS is measured)

from bindweave.model.speed import apply_speed_options  # noqa: E402
from bindweave.settings.model import SpeedOptions  # noqa: E402
from parallel.fsdp import load_sharded_bindweave  # noqa: E402
from support.dit_inputs import tiny_dit_inputs as inputs  # noqa: E402


def main(checkpoint: Path, out: Path, ulysses: int, speed: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // ulysses, ulysses), mesh_dim_names=("fsdp_rest", "sequence"))
    world_mesh = init_device_mesh("cpu", (world,))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, stats = load_sharded_bindweave(checkpoint, world_mesh, torch.float32, torch.device("cpu"), fuse=speed)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if speed:
        apply_speed_options(model, SpeedOptions(attention="cudnn", fuse_projections=True, compile=True, compile_backend="aot_eager"))
    if ulysses > 1:
        from parallel.deepspeed_backend import DeepSpeedUlyssesAttention
        from parallel.sequence import SequenceParallelHook

        group = mesh.get_group("sequence")
        model.set_attention_hook(SequenceParallelHook(group, DeepSpeedUlyssesAttention(group)))
    x = inputs(height=int(model.config.patch_size[1]) * 3, width=8)
    x = {k: v.to(torch.float32) for k, v in x.items()}
    x["t5_embeds"] = torch.randn(1, 512, model.config.text_dim, generator=torch.Generator().manual_seed(5))
    x["qwen_states"] = torch.randn(1, 7, model.config.mllm_dim, generator=torch.Generator().manual_seed(6))
    x["clip_embeds"] = torch.randn(1, 1028, model.config.image_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        velocity = model(**x)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(velocity, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "bytes_read": stats.bytes_read, "tensors": stats.tensors,
        "rss_growth_kb": rss_loaded - rss_before,
        "fused_blocks": sum(hasattr(block.attn1, "to_qkv") and hasattr(block.attn2, "to_kv") for block in model.blocks),
        "compiled_blocks": sum(block._compiled_call_impl is not None for block in model.blocks),
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}))
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("ulysses", type=int, nargs="?", default=1)
    parser.add_argument("--speed", action="store_true")
    args = parser.parse_args()
    main(args.checkpoint, args.out, args.ulysses, args.speed)
