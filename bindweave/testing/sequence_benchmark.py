"""The 1-8 GPU job projected from one GPU: each Ulysses rank's compute measured, its communication
counted from the code and priced at an assumed interconnect bandwidth (issue 19).

    python launch/bench.py parts=[ulysses] layers=10     # conf/bench.yaml: ulysses_*, interconnect_gb_s, video_*

One device runs the DiT forward as ONE rank of a Ulysses group of degree N does (EmulatedUlyssesRank):
its ceil(T / N) tokens through every block, self-attention at the shapes after the all-to-all (the
whole padded sequence, H / N heads) with the chosen kernel, no communication. The bytes a rank sends
per forward come from ``parallel.sequence.ulysses_bytes_per_rank`` (checked against a real gloo run
in tests/test_sequence_projection.py). ``project_layouts`` adds the two, without overlap, for the
cfg x ulysses layouts of one video on 1, 2, 4 and 8 GPUs.
"""

from __future__ import annotations

import math
import statistics

import torch
from omegaconf import DictConfig

from bindweave.model.attention import AttentionHook
from bindweave.model.flops import video_tokens
from bindweave.model.speed import apply_speed_options, probe_kernel_facts, resolve_speed_options
from bindweave.settings.model import SpeedOptions
from bindweave.testing.benchmark import (Clock, Report, build_dit, compile_stats, compute_dtype, dit_configs,
                                         dit_inputs, first_blocks, measure, peak_memory, scaled_to_full_depth)
from parallel.cfg import cfg_exchange_bytes_per_rank
from parallel.deepspeed_backend import attention_over_valid_keys
from parallel.sequence import rank_chunk, ulysses_bytes_per_rank

# (cfg, ulysses) of each projected layout: both ways of spending 2, 4 and 8 GPUs on one video.
LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (2, 4), (1, 8))


class EmulatedUlyssesRank(AttentionHook):
    """One rank of a Ulysses group of ``degree`` ranks, without communication: numerically
    meaningless, compute-exact.

    Each all-to-all is replaced by a reshape of the rank's own chunk into the shape the all-to-all
    would give (``[B, n, H, D]`` -> ``[B, n * degree, H / degree, D]`` and back, one copy each way
    as deepspeed's permutes do), and the token all-gather by repeating the chunk. Every kernel then
    sees the shapes a real rank's sees (same FLOPs, same memory), holding other values. ``kernel``
    is the single-device hook (``bindweave.model.speed``), whose kernel the ranks run.
    """

    def __init__(self, kernel: AttentionHook, degree: int):
        self.kernel = kernel
        self.degree = degree
        self.num_tokens: int | None = None

    def split_tokens(self, tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        self.num_tokens = tokens.shape[1]
        # Rank 0: every rank has the same (padded) shapes.
        return rank_chunk(tokens, 0, self.degree), tuple(rank_chunk(table, 0, self.degree) for table in rope)

    def self_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        query, key, value = (self._all_sequence_own_heads(x) for x in (query, key, value))
        attended = attention_over_valid_keys(self.kernel.self_attention, query, key, value, self.num_tokens)
        return self._own_sequence_all_heads(attended)

    def _all_sequence_own_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n, H, D]`` -> ``[B, n * degree, H / degree, D]``, as deepspeed's first all-to-all."""
        batch, length, heads, dim = x.shape
        local = heads // self.degree
        return x.reshape(batch, length, self.degree, local, dim).transpose(1, 2).reshape(batch, -1, local, dim)

    def _own_sequence_all_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse, as deepspeed's second all-to-all."""
        batch, length, local, dim = x.shape
        return x.reshape(batch, self.degree, length // self.degree, local, dim).transpose(1, 2).flatten(2, 3)

    def gather_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.repeat(1, self.degree, 1)[:, :self.num_tokens]


def project_layouts(rank_forward_s: dict[int, float], forward_bytes: dict[int, int], cfg_exchange_bytes: int,
                    interconnect_gb_s: float, steps: int, video_overhead_s: float = 0.0) -> list[dict]:
    """Seconds per forward, step and video of each of ``LAYOUTS`` whose Ulysses degree was measured.

    ``rank_forward_s``/``forward_bytes``: one rank's compute and sent bytes per forward, by Ulysses
    degree; ``cfg_exchange_bytes``: what a rank sends per step with cfg=2. Communication runs at
    ``interconnect_gb_s`` (GB/s per GPU, one direction) and never overlaps compute (conservative).
    A step is 2 forwards (CFG) with cfg=1, 1 forward and the prediction exchange with cfg=2; a
    video is ``steps`` steps plus ``video_overhead_s`` (loading, conditioning, decode).
    """
    bandwidth = interconnect_gb_s * 1e9
    rows = []
    for cfg, ulysses in LAYOUTS:
        if ulysses not in rank_forward_s:
            continue
        communication_s = forward_bytes[ulysses] / bandwidth
        forward_s = rank_forward_s[ulysses] + communication_s
        step_s = 2 // cfg * forward_s + (cfg_exchange_bytes / bandwidth if cfg == 2 else 0.0)
        rows.append(dict(gpus=cfg * ulysses, cfg=cfg, ulysses=ulysses, compute_s=rank_forward_s[ulysses],
                         communication_s=communication_s, forward_s=forward_s, step_s=step_s,
                         video_s=steps * step_s + video_overhead_s))
    one_gpu = next((row["video_s"] for row in rows if row["gpus"] == 1), None)
    for row in rows:
        row["speedup"] = one_gpu / row["video_s"] if one_gpu else None
    return rows


def projection_table(rows: list[dict], steps: int, interconnect_gb_s: float, video_overhead_s: float) -> list[str]:
    """``project_layouts``' rows as a markdown table (docs/PERFORMANCE.md)."""
    lines = [f"Projected from one GPU: {steps} steps with CFG, communication at {interconnect_gb_s:g} GB/s, "
             f"not overlapped, {video_overhead_s:g} s per video outside the steps",
             "", "| GPUs | layout | compute s/forward | comm. s/forward | s/step | s/video | speed-up |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        lines.append(f"| {row['gpus']} | cfg{row['cfg']} x ulysses{row['ulysses']} | {row['compute_s']:.3f} | "
                     f"{row['communication_s']:.3f} | {row['step_s']:.2f} | {row['video_s']:.1f} | {speedup} |")
    return lines


def run_ulysses(cfg: DictConfig, shape: dict, device: torch.device, report: Report) -> None:
    """One rank's forward per Ulysses degree (``cfg.ulysses_degrees``), timed in interleaved rounds
    on one model, scaled to the full depth; then the projection."""
    full_config, config = dit_configs(cfg)
    layers, full_layers, heads = config["num_layers"], full_config["num_layers"], config["num_attention_heads"]
    try:  # an unavailable kernel is noted, as the DiT part does
        options = resolve_speed_options(SpeedOptions(**dict(cfg.ulysses_options), compile=cfg.compile,
                                                     compile_backend=cfg.compile_backend),
                                        probe_kernel_facts(device), notes=[])
    except RuntimeError as error:
        report.skip("ulysses", str(error))
        return
    for degree in (degree for degree in cfg.ulysses_degrees if heads % degree):
        report.skip(f"ulysses_{degree}", f"Ulysses needs a degree that divides the {heads} heads")
    degrees = [degree for degree in cfg.ulysses_degrees if heads % degree == 0]
    model = build_dit(config, device, cfg.seed)
    inputs = dit_inputs(config, shape, device, cfg.seed + 1)
    tokens = video_tokens(config, *inputs["latents"].shape[2:])
    apply_speed_options(model, options)  # the blocks compile at their first call, with the rank hook in place
    hooks = {degree: EmulatedUlyssesRank(model.attention_hook, degree) for degree in degrees}
    clock = Clock(device)

    def forward(degree: int):
        model.set_attention_hook(hooks[degree])
        return model(**inputs)

    results: dict[int, dict] = {}
    torch._dynamo.utils.counters.clear()
    # Static shapes per degree, as each real rank compiles them (no dynamic graph for all degrees).
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for degree in degrees:
            if not report.fits(f"ulysses_{degree}", 90.0 if options.compile else 0.0):  # compiling: ~1 min on a GPU
                continue
            result = {"degree": degree, "tokens_per_rank": -(-tokens // degree), "heads_per_rank": heads // degree}
            try:
                with peak_memory(device, result):
                    result["first_s"] = clock.wall_seconds(lambda: forward(degree))
                    for _ in range(cfg.warmup - 1):
                        forward(degree)
                result["fixed_s"] = 0.0
                if layers != full_layers:  # the blocks-independent part, for the scaling to full depth
                    with first_blocks(model, 0):
                        result["fixed_s"] = measure(lambda: forward(degree), clock, cfg.warmup, cfg.repeats)["median_s"]
            except Exception as error:  # one degree that does not fit must not cost the others' numbers
                report.fail(f"ulysses_{degree}", error)
                continue
            result["times_s"] = []
            results[degree] = result
        round_s = 0.0  # the first round always runs (no number without it), the next ones if they fit
        for _ in range(cfg.repeats):
            if not report.fits("ulysses_timing_round", round_s):
                break
            for degree, result in results.items():
                result["times_s"].append(clock.seconds(lambda: forward(degree)))
            round_s = sum(result["times_s"][-1] for result in results.values())
    graphs = compile_stats()  # one graph per degree, none added by switching degrees
    torch._dynamo.reset()  # compiled graphs hold on to the model
    element_size = compute_dtype(device).itemsize
    head_out_channels = config["out_channels"] * math.prod(config["patch_size"])
    for degree, result in list(results.items()):
        if not result["times_s"]:
            del results[degree]
            continue
        result["median_s"] = statistics.median(result["times_s"])
        result["forward_s"] = scaled_to_full_depth(result["median_s"], result["fixed_s"], layers, full_layers)
        result["bytes_sent_per_forward"] = ulysses_bytes_per_rank(
            tokens, heads, config["attention_head_dim"], full_layers, degree, element_size, head_out_channels)
    report.add("ulysses", {"options": vars(options), "video_tokens": tokens, "layers_built": layers,
                           "layers_full": full_layers, "compile": graphs,
                           "degrees": list(results.values())})
    rows = project_layouts({degree: result["forward_s"] for degree, result in results.items()},
                           {degree: result["bytes_sent_per_forward"] for degree, result in results.items()},
                           cfg_exchange_bytes_per_rank(inputs["latents"].numel(), element_size, cfg_degree=2),
                           cfg.interconnect_gb_s, cfg.video_steps, cfg.video_overhead_s)
    report.add("ulysses_projection", {
        "interconnect_gb_s": cfg.interconnect_gb_s, "steps": cfg.video_steps, "video_overhead_s": cfg.video_overhead_s,
        "layouts": rows, "table": projection_table(rows, cfg.video_steps, cfg.interconnect_gb_s,
                                                                 cfg.video_overhead_s)})
