"""The speed options compute the same function, and the benchmark runs end to end (tiny, CPU)."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttention

import bindweave.testing.benchmark as bench
from bindweave.model.attention import AttentionHook, CrossAttnProcessor
from bindweave.model.attention import sdpa
from bindweave.model.kernels import resolve_kernel
from bindweave.model.speed import PreferredKernelAttention, apply_speed_options, fuse_projections, probe_kernel_facts
from bindweave.settings.model import SpeedOptions
from bindweave.model.flops import ForwardTokens, dit_forward_flops, video_tokens
from bindweave.model.transformer import TINY_CONFIG, BindWeaveTransformer
from support.dit_inputs import tiny_dit_inputs as tiny_inputs  # the same seeded tiny DiT inputs

REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return BindWeaveTransformer(**TINY_CONFIG).eval()


@pytest.mark.parametrize("attention", ["cudnn", "flash", "default"])
@torch.no_grad()
def test_speed_options_keep_the_output(attention):
    x = tiny_inputs()
    expected = tiny_model()(**x)
    fast = apply_speed_options(tiny_model(), SpeedOptions(attention=attention, fuse_projections=True, compile=False))
    torch.testing.assert_close(fast(**x), expected, rtol=1e-5, atol=1e-5)
    assert all(attn.fused_projections for attn in fast.modules() if isinstance(attn, WanAttention))


@torch.no_grad()
def test_fused_projections_hold_each_weight_once():
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    storage_bytes = sum(param.untyped_storage().nbytes() for param in model.parameters())
    fuse_projections(model)
    attn1, attn2 = model.blocks[0].attn1, model.blocks[0].attn2
    for part in (attn1.to_q, attn1.to_k, attn1.to_v):
        assert part.weight.untyped_storage().data_ptr() == attn1.to_qkv.weight.untyped_storage().data_ptr()
    for part in (attn2.add_k_proj, attn2.add_v_proj):
        assert part.weight.untyped_storage().data_ptr() == attn2.to_added_kv.weight.untyped_storage().data_ptr()
    unique = {param.untyped_storage().data_ptr(): param.untyped_storage().nbytes() for param in model.parameters()}
    assert sum(unique.values()) == storage_bytes
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())  # every key still loads


@torch.no_grad()
def test_compiled_blocks_match_eager_with_one_graph_for_all_blocks():
    """Regional compile (inductor, float32 on the CPU): output within float rounding noise of eager,
    and the 2 blocks share one graph with no graph breaks (so 40 blocks compile once)."""
    x = tiny_inputs()
    expected = tiny_model()(**x)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = apply_speed_options(tiny_model(), SpeedOptions(attention="cudnn", compile=True))
    output = model(**x)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    torch._dynamo.reset()


def test_fa4_without_the_package_or_a_gpu_fails_before_anything_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # as if flash-attn-4 were not installed
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    with pytest.raises(RuntimeError, match=r"attention=fa4 needs FlashAttention-4.*flash-attn-4.*attention=cudnn"):
        resolve_kernel("fa4", probe_kernel_facts(torch.device("cuda")), [])
    with pytest.raises(RuntimeError, match=r"attention=fa4: FlashAttention-4 .* runs on CUDA GPUs only and the model "
                                           r"is on cpu"):
        resolve_kernel("fa4", probe_kernel_facts(torch.device("cpu")), [])
    with pytest.raises(ValueError, match="takes resolved options"):  # the plan resolves; the model code does not
        apply_speed_options(tiny_model(), SpeedOptions(attention="auto"))


@pytest.fixture
def fa4_recorder(monkeypatch):
    """flash_attn.cute.interface with plain SDPA in FA4's place (the real kernel needs a Hopper GPU:
    tests/test_speed_gpu.py): checks the glue, i.e. the layout FA4 is given and that the compiled
    blocks keep the op as one opaque call."""
    calls = []

    def flash_attn_func(q, k, v):
        calls.append((q.shape, q.stride(-1)))
        return sdpa(q, k, v), None

    package = types.ModuleType("flash_attn")
    cute = types.ModuleType("flash_attn.cute")
    interface = types.ModuleType("flash_attn.cute.interface")
    interface.flash_attn_func = flash_attn_func
    for name, module in (("flash_attn", package), ("flash_attn.cute", cute), ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize("compile", [False, True])
@torch.no_grad()
def test_fa4_runs_self_attention_token_major_eager_and_compiled(fa4_recorder, monkeypatch, compile):
    # The glue on the CPU: the device check (FA4 is CUDA-only) is what lets the recorder stand in.
    x = tiny_inputs()
    expected = tiny_model()(**x)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = apply_speed_options(tiny_model(), SpeedOptions(attention="fa4", compile=compile))
    torch.testing.assert_close(model(**x), expected, rtol=1e-5, atol=1e-5)
    config = TINY_CONFIG
    _, frames, height, width = x["latents"].shape[1:]
    patch = config["patch_size"]
    tokens = (4 + frames) // patch[0] * (height // patch[1]) * (width // patch[2])  # 4 reference frames too
    # Every block's self-attention (and only that) went through FA4, token-major: [B, L, H, D].
    expected_shape = (1, tokens, config["num_attention_heads"], config["attention_head_dim"])
    assert fa4_recorder == [(expected_shape, 1)] * config["num_layers"]
    if compile:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()


@pytest.mark.parametrize("capability, installed, expected", [
    ((9, 0), True, "fa4"), ((10, 0), True, "fa4"), ((9, 0), False, "cudnn"), ((8, 0), True, "cudnn")])
def test_auto_attention_takes_fa4_where_it_runs(fa4_recorder, monkeypatch, capability, installed, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    if not installed:
        monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", None)
    cuda = probe_kernel_facts(torch.device("cuda"))
    assert resolve_kernel("auto", cuda, []) == expected
    assert resolve_kernel("auto", probe_kernel_facts(torch.device("cpu")), []) == "cudnn"
    assert resolve_kernel("flash", cuda, []) == "flash"


def test_preferred_kernel_rejects_unknown_names():
    with pytest.raises(ValueError, match="choose one of"):
        SpeedOptions(attention="fa3")


@torch.no_grad()
def test_bench_variants_switch_on_one_model():
    """The benchmark's variant states on one model: with one reference (257 CLIP tokens) and no Qwen
    tokens the stock split equals BindWeave's, so the stock forward must give our output; switching
    back and forth (fused projections and all) must give the plain model's output again."""
    x = tiny_inputs(qwen_tokens=0, clip_tokens=257)
    expected = tiny_model()(**x)
    model = tiny_model()
    variants = [bench.DitVariant("stock_eager", stock=True, compiled=False),
                bench.DitVariant("ours_eager", stock=False, compiled=False),
                bench.DitVariant("fast", stock=False, compiled=False,
                                 options=SpeedOptions(attention="flash", fuse_projections=True, compile=False))]
    states = bench.DitStates(model, variants, x, compile_backend="inductor")
    for variant in variants + variants:
        torch.testing.assert_close(states.call(variant)(), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(model.blocks[0].attn1.processor.hook, PreferredKernelAttention)
    assert model.blocks[0].attn1.fused_projections
    states.call(variants[1])
    assert type(model.blocks[0].attn1.processor.hook) is AttentionHook
    assert isinstance(model.blocks[0].attn2.processor, CrossAttnProcessor)
    assert not model.blocks[0].attn1.fused_projections


def test_bench_build_dit_keeps_diffusers_fp32_modules():
    model = bench.build_dit(dict(TINY_CONFIG), torch.device("cpu"), seed=0)
    dtypes = {name: param.dtype for name, param in model.named_parameters()}
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert all(param.abs().sum() > 0 for name, param in model.named_parameters() if name.endswith("weight"))


@pytest.mark.timeout(600)
def test_bench_tiny_cpu_runs_every_part(tmp_path):
    # aot_eager: dynamo traces exactly as for inductor, without the minutes of CPU code generation.
    command = [sys.executable, str(REPO / "launch" / "bench.py"), "preset=tiny", "device=cpu",
               "compile_backend=aot_eager", "repeats=1", f"out_dir={tmp_path}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    results = report["results"]
    for name in ("matmul", "attention_kernels", "dit_setup", "dit_stock_eager", "dit_ours_eager",
                 "dit_stock_compiled", "dit_ours_fast", "vae_decode", "vae_encode", "t5_encode", "clip_encode",
                 "qwen_prefill"):
        assert name in results, name
    tokens = ForwardTokens(video=video_tokens(TINY_CONFIG, 2, 8, 8), qwen=20)
    assert results["dit_setup"]["flops"]["total"] == dit_forward_flops(TINY_CONFIG, tokens)["total"]
    # One graph per compiled variant, none added by switching variants during the timed rounds.
    assert results["dit_compile"]["at_end"] == {"unique_graphs": 2, "graph_breaks": 0}
    assert results["dit_output_relative_error"]["ours_fast_vs_ours_eager"] < 1e-5
    assert results["dit_output_relative_error"]["stock_compiled_vs_stock_eager"] < 1e-5
    assert "ours_fast" in done.stdout and "qwen_prefill" in done.stdout
    assert "CUDA GPUs only" in report["skipped"]["dit_ours_fa4"]  # noted, and the other variants ran


@pytest.mark.timeout(300)
def test_bench_tiny_cpu_ulysses_part_measures_each_degree_and_projects(tmp_path):
    """The projection part end to end: one emulated rank per Ulysses degree (compiled, 1 of the 2
    blocks built and scaled), degree 4 skipped (the tiny DiT has 2 heads), the layouts they allow."""
    command = [sys.executable, str(REPO / "launch" / "bench.py"), "preset=tiny", "device=cpu", "parts=[ulysses]",
               "ulysses_degrees=[1,2,4]", "layers=1", "compile_backend=aot_eager", "repeats=1", f"out_dir={tmp_path}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    measured = report["results"]["ulysses"]
    tokens = video_tokens(TINY_CONFIG, 2, 8, 8)
    assert measured["video_tokens"] == tokens == 96
    assert [(entry["degree"], entry["tokens_per_rank"], entry["heads_per_rank"]) for entry in measured["degrees"]] \
        == [(1, 96, 2), (2, 48, 1)]
    for entry in measured["degrees"]:
        assert entry["forward_s"] > 0 and len(entry["times_s"]) == 1
        assert (entry["bytes_sent_per_forward"] > 0) == (entry["degree"] > 1)
    assert measured["compile"] == {"unique_graphs": 2, "graph_breaks": 0}  # one per degree, kept while interleaved
    assert "divides the 2 heads" in report["skipped"]["ulysses_4"]
    projection = report["results"]["ulysses_projection"]
    assert [(row["cfg"], row["ulysses"]) for row in projection["layouts"]] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    assert "| 4 | cfg2 x ulysses2 |" in done.stdout
