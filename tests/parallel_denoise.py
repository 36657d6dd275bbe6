"""Denoise with a seeded tiny DiT under a parallel layout and save every rank's final latents.

    torchrun --standalone --nproc_per_node=N tests/parallel_denoise.py OUT_DIR cfg=2 ulysses=2 \
        --grid 1x4x8 --grid 1x6x6 [--attend-padding]

Without torchrun it is the 1-process reference. No files are read: the model and the inputs
are built from fixed seeds. Each rank writes ``OUT_DIR/{grid}.rank{R}.pt``. A grid ``FxHxW`` is
the latent size; the DiT sees ``(4 + F) * H/2 * W/2`` tokens (1x4x8: 40, 1x6x6: 45).
``--attend-padding`` tells the backend that padded keys are valid (a deliberately wrong run).
``--device cuda`` runs on GPU LOCAL_RANK (NCCL), ``--dtype bfloat16`` in the DiT's real precision,
``--real-heads`` with 8 heads of 128 (what FA4 and sage2 take, and ulysses up to 8),
``--backend`` picks the sequence-parallel backend (default auto: deepspeed, xfuser for ring > 1 on CUDA).
``--kernel NAME`` installs that single-device kernel (bindweave.model.speed) before the layout is applied and
writes how often it ran on each rank to ``OUT_DIR/kernel_calls.rank{R}.txt``. ``--offload`` keeps
the blocks on the host and streams them in (bindweave.model.offload); ``--cache magcache`` runs a
step cache (published ratios, a threshold that skips) and writes each rank's skipped steps to
``OUT_DIR/skipped.{grid}.rank{R}.txt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.model.offload import offload_blocks  # noqa: E402
from bindweave.model.speed import PreferredKernelAttention  # noqa: E402
from bindweave.sampling.step_cache import StepCache  # noqa: E402
from bindweave.settings.sampling import CacheSettings, SamplerSettings  # noqa: E402
from bindweave.stages.phases import SampleInputs, dit_predictor  # noqa: E402
from bindweave.sampling.sampler import denoise, initial_noise, make_scheduler  # noqa: E402
from bindweave.model.transformer import TINY_CONFIG, BindWeaveTransformer  # noqa: E402
from parallel.fsdp import load_sharded_bindweave  # noqa: E402
from parallel.distributed import detect_processes, rank_device, start_process_group, stop_process_group  # noqa: E402
from parallel.layout import ParallelLayout  # noqa: E402
from parallel.parallelize import parallelize  # noqa: E402
from parallel.runtime import Runtime  # noqa: E402
from parallel.sequence import SequenceParallelHook  # noqa: E402

# 4 heads of 8 (TINY_CONFIG: 2 of 16; same width) so that ulysses=4 fits.
CONFIG = dict(TINY_CONFIG, num_attention_heads=4, attention_head_dim=8)
STEPS = 3


class CountingKernel(PreferredKernelAttention):
    """The chosen kernel, counting its calls (to show that the sequence backend runs it)."""

    calls = 0

    def self_attention(self, query, key, value):
        CountingKernel.calls += 1
        return super().self_attention(query, key, value)


class PaddingAttendingHook(SequenceParallelHook):
    """Deliberately wrong: tells the backend that every padded key is a real one."""

    def self_attention(self, query, key, value):
        return self.attention(query, key, value, valid_length=query.shape[1] * self.group_size)


def sample_inputs(model: BindWeaveTransformer, grid: tuple[int, int, int],
                  device: torch.device) -> tuple[torch.Tensor, SampleInputs]:
    frames, height, width = grid
    generator = torch.Generator().manual_seed(sum(grid))
    config = model.config

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, model.dtype)

    inputs = SampleInputs(
        t5={"positive": randn(1, 512, config.text_dim), "negative": randn(1, 512, config.text_dim)},
        qwen={"positive": randn(1, 7, config.mllm_dim), "negative": randn(1, 9, config.mllm_dim)},
        clip_embeds=randn(1, config.max_references * config.image_tokens_per_reference, config.image_dim),
        condition=randn(1, 20, config.max_references + frames, height, width),
    )
    return initial_noise((1, 16, frames, height, width), seed=1234).to(device), inputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("degrees", nargs="*", help="layout degrees, e.g. cfg=2 ulysses=2")
    parser.add_argument("--grid", action="append", required=True, help="latent FxHxW")
    parser.add_argument("--attend-padding", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over all ranks, loaded shard by shard from disk")
    parser.add_argument("--kernel", help="a single-device kernel (bindweave.model.speed) to install and count")
    parser.add_argument("--offload", action="store_true", help="the blocks on the host, streamed in per block")
    parser.add_argument("--cache", choices=["magcache", "teacache"], help="a step cache")
    parser.add_argument("--real-heads", action="store_true",
                        help="8 heads of 128 (the 14B DiT's head size, for FA4/sage2; ulysses up to 8)")
    args = parser.parse_args()
    global CONFIG
    if args.real_heads:
        CONFIG = dict(CONFIG, num_attention_heads=8, attention_head_dim=128, added_kv_proj_dim=1024)

    processes = detect_processes()
    degrees = {name: int(value) for name, value in (degree.split("=") for degree in args.degrees)}
    layout = ParallelLayout(**degrees, backend=args.backend, fsdp=("dit",) if args.fsdp else (), fsdp_scope="world")
    layout.validate(processes.world_size, CONFIG["num_attention_heads"], args.device)
    start_process_group(processes, args.device, timeout_s=120)
    try:
        device = rank_device(processes, args.device)
        torch.manual_seed(0)
        model = BindWeaveTransformer(**CONFIG).eval().to(device, getattr(torch, args.dtype))
        runtime = Runtime.build(layout, processes, device)
        if args.fsdp:  # the same seeded weights, written once, read back as per-rank shards
            checkpoint = args.out_dir / "checkpoint"
            runtime.from_rank0(lambda: model.save_pretrained(checkpoint))
            model, _ = load_sharded_bindweave(checkpoint, runtime.fsdp_mesh, getattr(torch, args.dtype), device)
        if args.kernel:
            model.set_attention_hook(CountingKernel(args.kernel))
        if args.offload:
            offload_blocks(model.cpu(), device)
        parallelize(model, runtime)
        if args.attend_padding:
            model.set_attention_hook(PaddingAttendingHook(runtime.sequence_group, model.attention_hook.attention))
        for grid_text in args.grid:
            noise, inputs = sample_inputs(model, tuple(int(n) for n in grid_text.split("x")), device)
            cache = StepCache(CacheSettings(kind=args.cache, threshold=0.5, first_exact_steps=1), STEPS) \
                if args.cache else None
            velocity = runtime.guided_velocity(dit_predictor(model, inputs, cache), 5.0)
            latents = denoise(noise, make_scheduler(SamplerSettings(num_steps=STEPS)), velocity)
            args.out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(latents.cpu(), args.out_dir / f"{grid_text}.rank{processes.rank}.pt")
            if cache is not None:
                (args.out_dir / f"skipped.{grid_text}.rank{processes.rank}.txt").write_text(
                    repr(cache.record()["skipped_steps"]))
        if args.kernel:
            (args.out_dir / f"kernel_calls.rank{processes.rank}.txt").write_text(str(CountingKernel.calls))
    finally:
        stop_process_group()


if __name__ == "__main__":
    main()
