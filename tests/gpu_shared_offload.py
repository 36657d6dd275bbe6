"""Two processes of one launch stream the tiny DiT's offloaded blocks from ONE host buffer on the
same GPU (run by tests/test_memory_gpu.py under torchrun; the GPU host we test on has one GPU, so
both ranks use cuda:0 and a gloo group):

    torchrun --standalone --nproc_per_node=2 tests/gpu_shared_offload.py TINY_ROOT OUT_DIR

Rank 0 reads the files into the buffer, rank 1 maps it (parallel.runtime.Runtime.share_host_buffer);
each page-locks its mapping, denoises offloaded and resident, and writes ``OUT_DIR/rank{R}.json``:
whether the latents are bit-identical, whether every block weight is pinned and inside the buffer,
and which process read the files.
"""

from __future__ import annotations

from dataclasses import replace
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from bindweave.io.inputs import read_meta  # noqa: E402
from bindweave.settings.model import ModelSettings  # noqa: E402
from bindweave.app.build import BuildRequest, plan_build  # noqa: E402
from bindweave.settings.model import VideoSettings  # noqa: E402
from bindweave.stages.models import load_stage3_models  # noqa: E402
from support.engines import build_models  # noqa: E402
from bindweave.testing.demo import demo_meta_with_hidden_states  # noqa: E402
from bindweave.testing.tiny import write_tiny_models  # noqa: E402
from parallel.layout import ParallelLayout  # noqa: E402
from parallel.runtime import Runtime  # noqa: E402
from test_memory_gpu import latents_of  # noqa: E402


@torch.no_grad()
def main(tiny_root: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    runtime = Runtime(layout=ParallelLayout(data=2), device=torch.device("cuda", 0), rank=rank, world_size=2,
                      local_rank=int(os.environ["LOCAL_RANK"]), mesh=init_device_mesh("cpu", (2,)))
    tiny = write_tiny_models(tiny_root) if rank == 0 else None
    dist.barrier()
    tiny = tiny or write_tiny_models(tiny_root)
    settings = ModelSettings(tiny_root=str(tiny_root), dtype="bfloat16", device="cuda", cache_dir=str(out / "cache"))
    plan = plan_build(BuildRequest(replace(settings, memory="offload"), VideoSettings(height=48, width=64, num_frames=5)))
    offloaded = load_stage3_models(replace(plan, share_host_buffer=True), share_host_buffer=runtime.share_host_buffer)
    resident = build_models(settings)
    meta = demo_meta_with_hidden_states(out / f"demo{rank}", hidden_dim=resident.hidden_dim, qwen_folder=tiny.qwen)
    sample = read_meta(meta)[0]
    identical = torch.equal(latents_of(offloaded, sample), latents_of(resident, sample))
    torch.cuda.synchronize()
    host = offloaded.transformer.host_buffer
    start = host.tensor.data_ptr()
    weights = [parameter for block in offloaded.transformer.blocks for parameter in block.parameters()]
    report = {
        "identical_latents": identical,
        "all_pinned": all(parameter.device.type == "cpu" and parameter.is_pinned() for parameter in weights),
        "all_in_buffer": all(start <= parameter.data_ptr() < start + host.handle.nbytes for parameter in weights),
        "registered": host.pinned,
        "read_by": host.handle.pid,
        "pid": os.getpid(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
