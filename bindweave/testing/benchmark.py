"""Speed and memory of every model of a 720P BindWeave job on one GPU, with random bf16 weights.

    python launch/bench.py                              # everything, full size (one H100: ~7 min)
    python launch/bench.py layers=10 parts=[dit]        # quick DiT iteration, scaled to 40 blocks
    python launch/bench.py layers=10 parts=[ulysses]    # the 1-8 GPU projection (sequence_benchmark.py)
    python launch/bench.py preset=tiny device=cpu       # smoke run of every code path (tests)

Models are built directly on the device in bf16 (no checkpoints, no fp32 copy): the DiT on the
meta device, then allocated and filled with random values; the others under the device context.
Times are the median of ``repeats`` calls after ``warmup`` calls, timed with CUDA events; the DiT
variants (conf/bench.yaml) share one model and are timed in interleaved rounds. TFLOP/s come from
bindweave.model.flops and are compared with a bf16 8192^3 matmul timed in the same run (``mfu`` =
achieved / matmul rate). Numbers go to ``out_dir/bench.json`` after every step, so a run stopped
early keeps what it measured; the table at the end is what docs/PERFORMANCE.md records.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import math
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    WanRotaryPosEmbed,
    WanTransformer3DModel,
)

from bindweave.model.attention import SelfAttnProcessor
from bindweave.io.checkpoint import keeps_fp32
from bindweave.testing.fullsize import (
    CLIP_VIT_H_CONFIG,
    QWEN25_VL_7B_TEXT,
    QWEN25_VL_7B_VISION,
    QWEN25_VL_TOKEN_IDS,
    UMT5_XXL_CONFIG,
    WAN_VAE_CONFIG,
    fill_random_,
)
from bindweave.model.fp8 import quantize_linears_fp8
from bindweave.model.speed import (PreferredKernelAttention, fa4_attention, fuse_projections, import_fa4,
                                   probe_kernel_facts, resolve_speed_options)
from bindweave.settings.model import SpeedOptions
from bindweave.model.flops import ForwardTokens, dit_forward_flops, video_tokens
from bindweave.model.transformer import BINDWEAVE_14B_CONFIG, TINY_CONFIG, BindWeaveTransformer

log = logging.getLogger("bench")
VARIANT_ORDER = ("stock_eager", "ours_eager", "stock_compiled", "ours_fast")
GIB = 2**30

# Shapes of the job each preset stands for. Qwen prefill: SPEC §3's singleface_1 (man.png gives a
# 44 x 36 patch grid = 396 tokens after the 2 x 2 merge; L = 526).
PRESETS = {
    "full": dict(height=720, width=1280, frames=81, qwen_tokens=600, qwen_prefill_tokens=526,
                 qwen_image_grid=(1, 44, 36), t5_true_tokens=120, clip_images=4, matmul_size=8192),
    "tiny": dict(height=64, width=64, frames=5, qwen_tokens=20, qwen_prefill_tokens=24,
                 qwen_image_grid=(1, 4, 4), t5_true_tokens=10, clip_images=4, matmul_size=256),
}

# Full-size seconds each part takes on an H100 with build and 4 calls (for the deadline).
ENCODER_ESTIMATES_S = {"vae_decode": 40, "vae_encode": 40, "t5_encode": 25, "clip_encode": 10, "qwen_prefill": 35}


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs, as the pipeline runs; float32 on the CPU (smoke runs: CPU bf16 kernels are slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---- measuring ------------------------------------------------------------------------------------


class Clock:
    """Times one call: CUDA events on a GPU (device time between them), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def seconds(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def wall_seconds(self, fn) -> float:
        """Host wall time including compilation, synchronised."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def measure(fn, clock: Clock, warmup: int, repeats: int) -> dict:
    """``first_s`` (wall, includes any compilation), then ``warmup - 1`` more untimed calls, then
    ``repeats`` timed calls: their ``median_s`` and all ``times_s``."""
    first = clock.wall_seconds(fn)
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = [clock.seconds(fn) for _ in range(repeats)]
    return {"first_s": first, "median_s": statistics.median(times), "times_s": times}


@contextmanager
def peak_memory(device: torch.device, into: dict):
    """Peak allocated GiB inside the block, into ``into["peak_gib"]``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    if device.type == "cuda":
        into["peak_gib"] = torch.cuda.max_memory_allocated() / GIB


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Report:
    """All numbers of the run, written to ``bench.json`` after every step."""

    def __init__(self, path: Path, header: dict, deadline_s: float | None):
        self.path = path
        self.data = {**header, "results": {}, "skipped": {}, "failed": {}}
        self.start = time.perf_counter()
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, name: str, estimate_s: float) -> bool:
        """False (and noted) if a step estimated at ``estimate_s`` would end past the deadline."""
        if self.deadline_s is None or self.elapsed() + estimate_s <= self.deadline_s:
            return True
        self.skip(name, f"estimated {estimate_s:.0f} s, {self.deadline_s - self.elapsed():.0f} s left")
        return False

    def skip(self, name: str, why: str):
        self.data["skipped"][name] = why
        log.warning("skipping %s: %s", name, why)
        self.write()

    def fail(self, name: str, error: Exception):
        log.exception("%s failed", name)
        self.data["failed"][name] = f"{type(error).__name__}: {error}"[:500]
        self.write()

    def add(self, name: str, result: dict):
        self.data["results"][name] = result
        log.info("%s: %s", name, json.dumps(_rounded(result)))
        self.write()

    def write(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_rounded(self.data), indent=1) + "\n")
        tmp.replace(self.path)


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(item) for item in value]
    return value


# ---- building models with random weights on the device -------------------------------------------


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_dit(config: dict, device: torch.device, seed: int) -> BindWeaveTransformer:
    """The DiT as the checkpoint loader leaves it (bf16 on a GPU, diffusers' fp32 modules in fp32), with
    random values: built on the meta device, then allocated on ``device`` (no fp32 copy anywhere)."""
    with torch.device("meta"):
        model = BindWeaveTransformer(**config)
    fp32_modules = model._keep_in_fp32_modules
    with torch.no_grad():
        for name, param in list(model.named_parameters()):
            module_name, _, param_name = name.rpartition(".")
            module = model.get_submodule(module_name)
            dtype = torch.float32 if keeps_fp32(name, fp32_modules) else compute_dtype(device)
            setattr(module, param_name, torch.nn.Parameter(torch.empty_like(param, dtype=dtype, device=device),
                                                           requires_grad=False))
    fill_random_(model, torch.Generator(device).manual_seed(seed))
    # Non-persistent float64 tables, computed from the config (as bindweave.io.checkpoint does).
    model.rope = WanRotaryPosEmbed(config["attention_head_dim"], config["patch_size"], config["rope_max_seq_len"]).to(device)
    left_on_meta = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    if left_on_meta:
        raise RuntimeError(f"build_dit left tensors on the meta device: {left_on_meta[:5]}")
    return model.eval()


def build_on_device(factory, device: torch.device, seed: int) -> torch.nn.Module:
    """``factory()`` constructed under the device context in the compute dtype (library init), then re-filled."""
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(compute_dtype(device)):
        model = factory()
    model = model.eval().requires_grad_(False)
    fill_random_(model, torch.Generator(device).manual_seed(seed))
    return model


# ---- DiT ------------------------------------------------------------------------------------------


def dit_inputs(config: dict, shape: dict, device: torch.device, seed: int) -> dict:
    latent_frames, latent_height, latent_width = 1 + (shape["frames"] - 1) // 4, shape["height"] // 8, shape["width"] // 8
    generator = torch.Generator(device).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=generator, device=device, dtype=compute_dtype(device))

    return dict(
        latents=randn(1, 16, latent_frames, latent_height, latent_width),
        timestep=torch.tensor([999], device=device),
        t5_embeds=randn(1, 512, config["text_dim"]),
        qwen_states=randn(1, shape["qwen_tokens"], config["mllm_dim"]),
        clip_embeds=randn(1, config["max_references"] * config["image_tokens_per_reference"], config["image_dim"]),
        condition=randn(1, 20, config["max_references"] + latent_frames, latent_height, latent_width),
    )


def stock_forward(model: BindWeaveTransformer, inputs: dict) -> torch.Tensor:
    """diffusers' own ``WanTransformer3DModel.forward`` on our weights and the same tokens: the 4
    reference slots prepended by hand, the same text context; its processor splits the context at
    ``len - 512`` (same K/V token total, so the same FLOPs; not BindWeave's output)."""
    latents = inputs["latents"]
    references = model.config.max_references
    slots = latents.new_zeros(latents.shape[0], latents.shape[1], references, *latents.shape[3:])
    hidden = torch.cat([torch.cat([slots, latents], dim=2), inputs["condition"]], dim=1)
    context = model.build_context(inputs["t5_embeds"], inputs["qwen_states"])
    output = WanTransformer3DModel.forward(model, hidden, inputs["timestep"], encoder_hidden_states=context,
                                           encoder_hidden_states_image=inputs["clip_embeds"], return_dict=False)[0]
    return output[:, :, references:]


@contextmanager
def first_blocks(model: torch.nn.Module, count: int):
    """The model with only its first ``count`` blocks, for the duration (profiling, fixed cost)."""
    blocks = model.blocks
    model.blocks = torch.nn.ModuleList(list(blocks)[:count])
    try:
        yield
    finally:
        model.blocks = blocks


KERNEL_CLASSES = (  # first match wins (fused Triton kernels are named after every op they hold)
    ("compiled fused (triton)", re.compile(r"triton", re.I)),
    ("attention", re.compile(r"fmha|flash|attention|sdpa|mha", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|addmm|aten::mm|aten::bmm|conv", re.I)),
)


def profile_forward(call, device: torch.device, top: int = 12) -> dict:
    """Device time by kernel class and the top kernels of one ``call()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        call()
        Clock(device).sync()
    kernels = []
    for event in prof.key_averages():
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            seconds = event.self_device_time_total / 1e6
        else:
            if "::" not in event.key:
                continue
            seconds = event.self_cpu_time_total / 1e6
        kernels.append((event.key, event.count, seconds))
    total = sum(seconds for _, _, seconds in kernels) or 1.0
    classes: dict[str, float] = {}
    for name, _, seconds in kernels:
        label = next((label for label, pattern in KERNEL_CLASSES if pattern.search(name)), "eager element-wise/other")
        classes[label] = classes.get(label, 0.0) + seconds
    kernels.sort(key=lambda kernel: -kernel[2])
    attention_pattern = dict(KERNEL_CLASSES)["attention"]
    # Separately, to tell the long self-attention calls from the short cross-attention ones.
    attention_calls = [event.time_range.elapsed_us() / 1e6 for event in prof.events()
                       if attention_pattern.search(event.name) and "triton" not in event.name
                       and (device.type != "cuda" or event.device_type == torch.autograd.DeviceType.CUDA)]
    return {
        "device_s": total,
        "attention_calls_s": attention_calls,
        "by_class_s": dict(sorted(classes.items(), key=lambda item: -item[1])),
        "top_kernels": [{"name": name[:120], "calls": count, "s": seconds} for name, count, seconds in kernels[:top]],
    }


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference.float()).norm() / reference.float().norm()).item()


@dataclass(frozen=True)
class DitVariant:
    """One way of running the same DiT (conf/bench.yaml ``variants``)."""

    name: str
    stock: bool  # diffusers' forward and WanAttnProcessor
    compiled: bool
    options: SpeedOptions | None = None  # ours_fast only


def dit_variants(cfg: DictConfig) -> list[DitVariant]:
    variants = []
    for name in VARIANT_ORDER:
        if name not in cfg.variants or (name == "stock_compiled" and not cfg.compile):
            continue
        if name == "ours_fast":
            for entry in cfg.fast_options:
                entry = dict(entry)
                label = entry.pop("name", name)
                variants.append(DitVariant(label, stock=False, compiled=cfg.compile,
                                           options=SpeedOptions(**entry, compile=cfg.compile)))
        else:
            variants.append(DitVariant(name, stock=name.startswith("stock"), compiled=name.endswith("compiled")))
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"DiT variant names repeat: {names}; give each fast_options entry its own name")
    return variants


def kernel_available(variant: DitVariant, device: torch.device, report: Report) -> bool:
    """FA4 / sage2 variants need a CUDA GPU and their package, FP8 ones an FP8 GPU and torchao;
    without them they are skipped (noted in the report) and the other variants still run."""
    if variant.options is None:
        return True
    try:
        resolve_speed_options(variant.options, probe_kernel_facts(device), notes=[])
    except RuntimeError as error:
        report.skip(f"dit_{variant.name}", str(error))
        return False
    return True


def precision_of(variant: DitVariant) -> str:
    return variant.options.linear_precision if variant.options is not None else "dtype"


class DitStates:
    """Switches one model between variants in any order, without rebuilding or recompiling.

    Each variant's processors and hook are made once, so torch.compile's guards meet the same
    objects every time and pick the graph compiled for that variant (one graph per compiled
    variant, shared by all blocks). Projections are fused once (the separate layers become views
    of the fused weights) and each variant sets the flag that says which ones to use. Eager
    variants run the compiled blocks under ``torch.compiler.set_stance("force_eager")``.
    """

    def __init__(self, model: BindWeaveTransformer, variants: list[DitVariant], inputs: dict, compile_backend: str):
        self.model = model
        self.inputs = inputs
        self.attentions = [attn for block in model.blocks for attn in (block.attn1, block.attn2)]
        plain_hook, ours = model.attention_hook, [attn.processor for attn in self.attentions]
        self.setups = {}
        for variant in variants:
            if variant.stock:
                self.setups[variant.name] = ([WanAttnProcessor() for _ in self.attentions], None, False)
            elif variant.options is None:
                self.setups[variant.name] = (ours, plain_hook, False)
            else:
                hook = PreferredKernelAttention(variant.options.attention)
                processors = [SelfAttnProcessor(hook) if isinstance(processor, SelfAttnProcessor) else processor
                              for processor in ours]
                self.setups[variant.name] = (processors, hook, variant.options.fuse_projections)
        if any(fused for _, _, fused in self.setups.values()):
            fuse_projections(model)
        if any(variant.compiled for variant in variants):
            model.compile_repeated_blocks(backend=compile_backend)

    def call(self, variant: DitVariant):
        """Put the model in ``variant``'s state and return its forward call."""
        processors, hook, fused = self.setups[variant.name]
        for attn, processor in zip(self.attentions, processors):
            attn.set_processor(processor)
            attn.fused_projections = fused and hasattr(attn, "to_added_kv" if attn.is_cross_attention else "to_qkv")
        if hook is not None:
            self.model.set_attention_hook(hook)
        forward = (lambda: stock_forward(self.model, self.inputs)) if variant.stock else (lambda: self.model(**self.inputs))
        if variant.compiled:
            return forward

        def eager():
            with torch.compiler.set_stance("force_eager"):
                return forward()

        return eager


def dit_configs(cfg: DictConfig) -> tuple[dict, dict]:
    """The preset's DiT config, and the one built: ``cfg.layers`` blocks of it (null: all)."""
    full_config = dict(BINDWEAVE_14B_CONFIG if cfg.preset == "full" else TINY_CONFIG)
    return full_config, dict(full_config, num_layers=cfg.layers or full_config["num_layers"])


def scaled_to_full_depth(seconds: float, fixed_s: float, layers: int, full_layers: int) -> float:
    """A forward through ``layers`` blocks, timed at ``seconds``, as one through ``full_layers``:
    the blocks-independent ``fixed_s`` once, the rest per block."""
    return fixed_s + (seconds - fixed_s) * full_layers / layers


def run_dit(cfg: DictConfig, shape: dict, device: torch.device, report: Report, matmul_tflops: float | None):
    """Every variant on one model: first calls (compilation) in order, then ``repeats`` rounds that
    time each variant once per round, so clock or temperature drift hits all of them alike."""
    full_config, config = dit_configs(cfg)
    full_layers, layers = full_config["num_layers"], config["num_layers"]
    clock = Clock(device)
    latent_frames = 1 + (shape["frames"] - 1) // 4
    tokens = ForwardTokens(video=video_tokens(config, latent_frames, shape["height"] // 8, shape["width"] // 8),
                           qwen=shape["qwen_tokens"],
                           clip=config["max_references"] * config["image_tokens_per_reference"])
    flops = dit_forward_flops(full_config, tokens)
    variants = [variant for variant in dit_variants(cfg) if kernel_available(variant, device, report)]
    log.info("DiT: %d of %d blocks, %d video tokens, %.3f PFLOP per full forward; variants %s", layers,
             full_layers, tokens.video, flops["total"] / 1e15, [variant.name for variant in variants])

    if any(precision_of(v) == "fp8" and not v.options.fuse_projections for v in variants):
        raise SystemExit("FP8 variants quantize the fused q/k/v layer: give them fuse_projections: true")
    start = time.perf_counter()
    model = build_dit(config, device, cfg.seed)
    clock.sync()
    inputs = dit_inputs(config, shape, device, cfg.seed + 1)
    report.add("dit_setup", {"layers_built": layers, "layers_full": full_layers,
                             "parameters": sum(param.numel() for param in model.parameters()),
                             "build_s": time.perf_counter() - start, "tokens": vars(tokens), "flops": flops,
                             "weights_gib": torch.cuda.memory_allocated() / GIB if device.type == "cuda" else None,
                             "variants": {variant.name: {"stock": variant.stock, "compiled": variant.compiled,
                                                         "options": vars(variant.options) if variant.options else None}
                                          for variant in variants}})
    with torch.no_grad():
        # Blocks-independent cost (patch embedding, embedders, head), so that a run with fewer
        # blocks scales to the full depth as fixed + (time - fixed) * full / built.
        fixed_s = 0.0
        if layers != full_layers:
            with first_blocks(model, 0):
                fixed_s = measure(lambda: model(**inputs), clock, cfg.warmup, cfg.repeats)["median_s"]
        # FP8 variants run on a second model with the same random weights, quantized once.
        states = {"dtype": DitStates(model, [v for v in variants if precision_of(v) == "dtype"], inputs,
                                     cfg.compile_backend)}
        if any(precision_of(v) == "fp8" for v in variants):
            fp8_model = build_dit(config, device, cfg.seed)
            fuse_projections(fp8_model)
            quantize_linears_fp8(fp8_model)
            states["fp8"] = DitStates(fp8_model, [v for v in variants if precision_of(v) == "fp8"], inputs,
                                      cfg.compile_backend)
            report.add("dit_fp8_setup", {"weights_gib_both_models": torch.cuda.memory_allocated() / GIB
                                         if device.type == "cuda" else None})
        torch._dynamo.utils.counters.clear()
        results: dict[str, dict] = {}
        outputs: dict[str, torch.Tensor] = {}
        forward_estimate_s = None  # from eager first calls
        for variant in variants:
            estimate = cfg.warmup * (forward_estimate_s or 0.0) + (90.0 if variant.compiled else 0.0)
            if not report.fits(f"dit_{variant.name}", estimate):
                continue
            result: dict = {}
            try:
                call = states[precision_of(variant)].call(variant)
                with peak_memory(device, result):
                    result["first_s"] = clock.wall_seconds(lambda: outputs.__setitem__(variant.name, call()))
                    for _ in range(cfg.warmup - 1):
                        call()
            except Exception as error:  # one broken variant must not cost the others' numbers
                report.fail(f"dit_{variant.name}", error)
                continue
            result["times_s"] = []
            results[variant.name] = result
            if not variant.compiled:
                forward_estimate_s = max(forward_estimate_s or 0.0, result["first_s"])
        graphs_after_first_calls = compile_stats()
        timed = [variant for variant in variants if variant.name in results]
        # The quickest first call is at least one forward (compiled first calls include compiling).
        round_estimate_s = len(timed) * min((results[v.name]["first_s"] for v in timed), default=0.0)
        for _ in range(cfg.repeats):
            if not report.fits("dit_timing_round", round_estimate_s):
                break
            for variant in timed:
                results[variant.name]["times_s"].append(clock.seconds(states[precision_of(variant)].call(variant)))
        for variant in timed:
            result = results[variant.name]
            if not result["times_s"]:
                continue
            result["median_s"] = statistics.median(result["times_s"])
            result["forward_s"] = scaled_to_full_depth(result["median_s"], fixed_s, layers, full_layers)
            result["tflops"] = flops["total"] / result["forward_s"] / 1e12
            result["mfu"] = result["tflops"] / matmul_tflops if matmul_tflops else None
            result["compile_s"] = max(result["first_s"] - result["median_s"], 0.0) if variant.compiled else None
            if layers != full_layers:
                result.update(fixed_s=fixed_s, scaled_from_layers=layers)
            if "profile" in cfg.parts:
                result["profile"] = profile_variant(cfg, states[precision_of(variant)].model,
                                                    states[precision_of(variant)].call(variant), device)
            report.add(f"dit_{variant.name}", result)
        report.add("dit_compile", {"after_first_calls": graphs_after_first_calls, "at_end": compile_stats(),
                                   "compiled_variants": sum(variant.compiled for variant in timed)})
        errors = {}
        for variant in timed:
            reference = "stock_eager" if variant.stock else "ours_eager"
            if variant.name != reference and reference in outputs:
                errors[f"{variant.name}_vs_{reference}"] = relative_error(outputs[variant.name], outputs[reference])
        if errors:
            report.add("dit_output_relative_error", errors)
    torch._dynamo.reset()  # compiled graphs hold on to the model; the next part frees it


def profile_variant(cfg: DictConfig, model, call, device: torch.device) -> dict:
    with first_blocks(model, cfg.profile_blocks):
        call()  # warm: a truncated model may hit new kernel plans
        result = profile_forward(call, device)
    result["blocks"] = cfg.profile_blocks
    return result


def compile_stats() -> dict:
    stats = torch._dynamo.utils.counters
    return {"unique_graphs": stats["stats"]["unique_graphs"], "graph_breaks": sum(stats["graph_break"].values())}


# ---- the other models ----------------------------------------------------------------------------


def run_matmul(cfg: DictConfig, shape: dict, device: torch.device, report: Report) -> float:
    size = shape["matmul_size"]
    generator = torch.Generator(device).manual_seed(cfg.seed)
    a, b = (torch.randn(size, size, device=device, dtype=compute_dtype(device), generator=generator) for _ in range(2))
    timing = measure(lambda: a @ b, Clock(device), warmup=3, repeats=10)
    tflops = 2 * size**3 / timing["median_s"] / 1e12
    report.add("matmul", {"size": size, "dtype": str(compute_dtype(device)).removeprefix("torch."), **timing,
                          "tflops": tflops})
    return tflops


def run_attention(cfg: DictConfig, shape: dict, device: torch.device, report: Report):
    """The DiT's attentions alone, per SDPA kernel: self-attention over all video tokens with q/k/v
    as the model hands them over (views of [B, tokens, heads, dim], separate or slices of one fused
    QKV output) and as contiguous [B, heads, tokens, dim]; the two cross-attentions (the video
    tokens against the 257 image and the text keys)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = BINDWEAVE_14B_CONFIG if cfg.preset == "full" else TINY_CONFIG
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    latent_frames = 1 + (shape["frames"] - 1) // 4
    n = video_tokens(config, latent_frames, shape["height"] // 8, shape["width"] // 8)
    image_keys = config["image_tokens_per_reference"]
    text_keys = shape["qwen_tokens"] + 512 + config["max_references"] * image_keys - image_keys
    dtype = compute_dtype(device)
    generator = torch.Generator(device).manual_seed(cfg.seed)

    def token_major(tokens: int, count: int = 1) -> torch.Tensor:
        return torch.randn(1, tokens, count, heads, head_dim, device=device, dtype=dtype, generator=generator)

    def views(tensor: torch.Tensor) -> list[torch.Tensor]:  # [B, tokens, k, heads, dim] -> k x [B, heads, tokens, dim]
        return [part.transpose(1, 2) for part in tensor.unbind(2)]

    fused_qkv = views(token_major(n, 3))
    separate = [views(token_major(n))[0] for _ in range(3)]
    query = separate[0]
    cases = {  # name -> (q, k, v, key tokens)
        "self/token_major_view": (*separate, n),
        "self/fused_qkv_view": (*fused_qkv, n),
        "self/heads_major": (*[x.contiguous() for x in separate], n),
        "cross_image": (query, *views(token_major(image_keys, 2)), image_keys),
        "cross_text": (query, *views(token_major(text_keys, 2)), text_keys),
    }
    def sdpa_with(backend):
        def attend(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return attend

    def fa4(q, k, v):  # FA4 takes the token-major layout the views came from
        return fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    kernels = {"cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION), "flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
               "efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION)} if device.type == "cuda" \
        else {"math": sdpa_with(SDPBackend.MATH)}
    if device.type == "cuda":
        try:
            import_fa4()
            kernels["fa4"] = fa4
        except RuntimeError as error:
            log.info("attention kernels: FA4 left out (%s)", error)
    result = {"tokens": n, "key_tokens": {"cross_image": image_keys, "cross_text": text_keys},
              "default_kernel": SDPBackend(torch._fused_sdp_choice(*separate)).name, "tflops": {}}
    for case, (q, k, v, keys) in cases.items():
        for kernel_name, kernel in kernels.items():
            if kernel_name == "efficient" and case in ("self/fused_qkv_view", "self/heads_major"):
                continue  # 3x slower than cuDNN: its layouts do not matter
            try:
                timing = measure(lambda: kernel(q, k, v), Clock(device), cfg.warmup, cfg.repeats)
            except RuntimeError as error:  # a kernel that does not take this input
                result["tflops"][f"{case}/{kernel_name}"] = f"unavailable: {str(error)[:100]}"
                continue
            result["tflops"][f"{case}/{kernel_name}"] = 4 * n * keys * heads * head_dim / timing["median_s"] / 1e12
    report.add("attention_kernels", result)
    del cases, fused_qkv, separate, query
    free_memory(device)


def run_encoders(cfg: DictConfig, shape: dict, device: torch.device, report: Report):
    clock = Clock(device)
    tiny = cfg.preset == "tiny"
    if tiny:
        from bindweave.testing.tiny import TINY_CLIP, TINY_QWEN_TEXT, TINY_QWEN_VISION, TINY_UMT5, TINY_VAE
    generator = torch.Generator(device).manual_seed(cfg.seed)

    def randn(*size):
        return torch.randn(*size, generator=generator, device=device, dtype=compute_dtype(device))

    def timed(name: str, build, call, extra=None):
        if not report.fits(name, ENCODER_ESTIMATES_S[name]):
            return
        result: dict = {}
        free_memory(device)  # what an earlier part left for the garbage collector must not count here
        try:
            with peak_memory(device, result):
                start = time.perf_counter()
                model = build()
                clock.sync()
                result["build_s"] = time.perf_counter() - start
                result["parameters"] = sum(param.numel() for param in model.parameters())
                with torch.no_grad():
                    result.update(measure(lambda: call(model), clock, cfg.warmup, cfg.repeats))
        except Exception as error:  # e.g. a config a library version refuses: keep the other parts
            report.fail(name, error)
        else:
            result.update(extra or {})
            report.add(name, result)

    latent_shape = (1, 16, 1 + (shape["frames"] - 1) // 4, shape["height"] // 8, shape["width"] // 8)
    if {"vae_decode", "vae_encode"} & set(cfg.parts):
        from diffusers import AutoencoderKLWan

        vae_config = TINY_VAE if tiny else WAN_VAE_CONFIG

        def build_vae():
            return build_on_device(lambda: AutoencoderKLWan(**vae_config), device, cfg.seed)

        if "vae_decode" in cfg.parts:
            latents = randn(*latent_shape)
            timed("vae_decode", build_vae, lambda vae: vae.decode(latents).sample,
                  {"latents": list(latent_shape), "frames": shape["frames"]})
            del latents
        if "vae_encode" in cfg.parts:
            # The video condition is VAE(an all-zero clip) (SPEC §5): zeros are the real input here.
            video = torch.zeros(1, 3, shape["frames"], shape["height"], shape["width"], device=device, dtype=compute_dtype(device))
            timed("vae_encode", build_vae, lambda vae: vae.encode(video).latent_dist.mode(),
                  {"video": list(video.shape), "note": "all-zero clip, once per resolution (cacheable)"})
            del video
    if "t5" in cfg.parts:
        from transformers import UMT5Config, UMT5EncoderModel

        t5_config = dict(TINY_UMT5, vocab_size=300) if tiny else UMT5_XXL_CONFIG
        ids = torch.randint(3, t5_config["vocab_size"], (1, 512), device=device, generator=generator)
        mask = (torch.arange(512, device=device) < shape["t5_true_tokens"]).long()[None]
        timed("t5_encode", lambda: build_on_device(lambda: UMT5EncoderModel(UMT5Config(**t5_config)), device, cfg.seed),
              lambda t5: t5(ids, attention_mask=mask).last_hidden_state, {"tokens": 512})
    if "clip" in cfg.parts:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        clip_config = TINY_CLIP if tiny else CLIP_VIT_H_CONFIG
        images = randn(shape["clip_images"], 3, clip_config["image_size"], clip_config["image_size"])

        def encode_references(clip):
            # One call per reference, as bindweave.encoders.conditioning.reference_condition does.
            return [clip(pixel_values=image[None], output_hidden_states=True).hidden_states[-2] for image in images]

        timed("clip_encode", lambda: build_on_device(lambda: CLIPVisionModel(CLIPVisionConfig(**clip_config)),
                                                     device, cfg.seed),
              encode_references, {"images": shape["clip_images"]})
    if "qwen" in cfg.parts:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        token_ids = dict(image_token_id=390, video_token_id=391, vision_start_token_id=388,
                         vision_end_token_id=389) if tiny else QWEN25_VL_TOKEN_IDS
        text = dict(TINY_QWEN_TEXT, vocab_size=400, bos_token_id=386, eos_token_id=387) if tiny else QWEN25_VL_7B_TEXT
        vision = TINY_QWEN_VISION if tiny else QWEN25_VL_7B_VISION
        qwen_config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
        grid = shape["qwen_image_grid"]
        patches = math.prod(grid)
        image_tokens = patches // vision["spatial_merge_size"] ** 2
        text_tokens = shape["qwen_prefill_tokens"] - image_tokens - 2
        prompt = torch.randint(0, min(text["vocab_size"], 151000) - 20, (text_tokens,), device=device, generator=generator)
        # The chat template's order (SPEC §3): text first, then <|vision_start|> image pads <|vision_end|>.
        ids = torch.cat([prompt, torch.tensor([token_ids["vision_start_token_id"]], device=device),
                         torch.full((image_tokens,), token_ids["image_token_id"], device=device),
                         torch.tensor([token_ids["vision_end_token_id"]], device=device)])[None]
        pixels = randn(patches, 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2)
        grid_thw = torch.tensor([grid], device=device)

        def prefill(qwen):
            # Stage 2 keeps the language model's last hidden state; the LM head is not needed.
            return qwen.model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid_thw).last_hidden_state

        timed("qwen_prefill",
              lambda: build_on_device(lambda: Qwen2_5_VLForConditionalGeneration(qwen_config), device, cfg.seed),
              prefill, {"tokens": ids.shape[1], "image_tokens": image_tokens})


# ---- summary -------------------------------------------------------------------------------------


def summary_lines(data: dict) -> list[str]:
    results = data["results"]
    lines = [f"{data['device_name']} | torch {data['torch']} | cuDNN {data['cudnn']} | {data['date']}"]
    if "matmul" in results:
        matmul = results["matmul"]
        lines.append(f"{matmul['dtype']} matmul {matmul['size']}^3: {matmul['tflops']:.0f} TFLOP/s")
    if "attention_kernels" in results:
        attention = results["attention_kernels"]
        lines.append(f"attention TFLOP/s, {attention['tokens']} queries, keys {attention['key_tokens']} "
                     f"(default kernel: {attention['default_kernel']}):")
        lines.extend(f"  {name:32s} {value:7.1f}" if isinstance(value, float) else f"  {name:32s} n/a"
                     for name, value in attention["tflops"].items())
    setup = results.get("dit_setup")
    if setup:
        scaled = (f", measured with {setup['layers_built']} blocks and scaled"
                  if setup["layers_built"] != setup["layers_full"] else "")
        lines.append(f"DiT forward ({setup['layers_full']} blocks{scaled}, "
                     f"{setup['flops']['total'] / 1e15:.2f} PFLOP):")
        lines.append(f"  {'variant':22s} {'s/forward':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'compile s':>9s} {'peak GiB':>8s}")
        for name in setup["variants"]:
            result = results.get(f"dit_{name}")
            if result is None:
                continue
            mfu = f"{result['mfu']:.3f}" if result.get("mfu") else "-"
            compile_s = f"{result['compile_s']:.1f}" if result.get("compile_s") is not None else "-"
            peak = f"{result['peak_gib']:.1f}" if "peak_gib" in result else "-"
            lines.append(f"  {name:22s} {result['forward_s']:10.3f} {result['tflops']:8.1f} {mfu:>6s} "
                         f"{compile_s:>9s} {peak:>8s}")
    for name in setup["variants"] if setup else ():
        profile = results.get(f"dit_{name}", {}).get("profile")
        if profile:
            classes = ", ".join(f"{label} {seconds / profile['blocks']:.4f}" for label, seconds in profile["by_class_s"].items())
            lines.append(f"  {name} per block (s, profiled with {profile['blocks']} blocks + embed/head): {classes}")
    if "dit_output_relative_error" in results:
        lines.append("  output relative error: " + ", ".join(
            f"{name} {value:.2e}" for name, value in results["dit_output_relative_error"].items()))
    if "ulysses_projection" in results:
        lines.extend(results["ulysses_projection"]["table"])
    for name in ("vae_decode", "vae_encode", "t5_encode", "clip_encode", "qwen_prefill"):
        if name in results:
            result = results[name]
            peak = f", peak {result['peak_gib']:.1f} GiB" if "peak_gib" in result else ""
            lines.append(f"{name:13s} {result['median_s']:8.3f} s (build {result['build_s']:.1f} s{peak})")
    for name, reason in data["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    for name, reason in data["failed"].items():
        lines.append(f"FAILED {name}: {reason}")
    return lines


def run_benchmark(cfg: DictConfig, more_parts: dict | None = None) -> None:
    """``launch/bench.py``: every part ``cfg.parts`` names, reported as it goes (conf/bench.yaml).
    ``more_parts``: part name -> ``run(cfg, shape, device, report)`` of the modules that build on
    this one (the launcher passes sequence_benchmark's ``ulysses``)."""
    if cfg.preset not in PRESETS:
        raise SystemExit(f"preset={cfg.preset}: choose one of {', '.join(PRESETS)}")
    unknown = set(cfg.variants) - set(VARIANT_ORDER)
    if unknown:
        raise SystemExit(f"variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANT_ORDER)}")
    dit_variants(cfg)  # validates the variants and speed options before any model is built
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device=cuda but no CUDA device is visible; use device=cpu (with preset=tiny)")
    shape = dict(PRESETS[cfg.preset])
    shape.update({key: cfg[key] for key in ("height", "width", "frames", "qwen_tokens") if cfg[key] is not None})
    import diffusers
    import transformers

    header = {
        "date": datetime.date.today().isoformat(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "config": OmegaConf.to_container(cfg, resolve=True), "shape": shape,
    }
    report = Report(Path(cfg.out_dir) / "bench.json", header, cfg.deadline_s)
    log.info("benchmark on %s, writing %s", header["device_name"], report.path)
    matmul_tflops = run_matmul(cfg, shape, device, report) if "matmul" in cfg.parts else None
    if "attention" in cfg.parts:
        run_attention(cfg, shape, device, report)
    if "dit" in cfg.parts:
        run_dit(cfg, shape, device, report, matmul_tflops)
    for name, run in (more_parts or {}).items():
        if name in cfg.parts:
            run(cfg, shape, device, report)
    run_encoders(cfg, shape, device, report)
    report.data["total_s"] = report.elapsed()
    report.write()
    print("\n".join(summary_lines(report.data)), flush=True)
    if report.data["failed"]:
        raise SystemExit(1)
