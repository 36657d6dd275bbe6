"""The fast modes' kernels and presets on the CPU (bindweave/model/speed.py, conf/speed/): SageAttention 2
is reached through the same hook and opaque op as FA4 (its real numbers: tests/test_speed_gpu.py), a
missing package or a CPU device is a clear error for the explicit choice and a logged fallback for
``auto_8bit``, and each ``speed=`` preset resolves to its documented options."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from bindweave.app.config import compose_config, settings_of
from bindweave.errors import BindWeaveInputError
from bindweave.model.attention import sdpa
from bindweave.model.kernels import DeviceFacts, resolve_kernel
from bindweave.model.speed import apply_speed_options, probe_kernel_facts
from bindweave.settings.model import SpeedOptions
from bindweave.model.transformer import TINY_CONFIG, BindWeaveTransformer
from support.dit_inputs import tiny_dit_inputs as tiny_inputs


@pytest.fixture
def sage_recorder(monkeypatch):
    """A `sageattention` package whose sageattn is SDPA (the real one needs a CUDA GPU)."""
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False):
        calls.append((tuple(q.shape), tensor_layout, is_causal))
        return sdpa(q, k, v)

    package = types.ModuleType("sageattention")
    package.sageattn = sageattn
    monkeypatch.setitem(sys.modules, "sageattention", package)
    return calls


def tiny_model() -> BindWeaveTransformer:
    torch.manual_seed(0)
    return BindWeaveTransformer(**TINY_CONFIG)


@pytest.mark.parametrize("compile", [False, True])
@torch.no_grad()
def test_sage2_runs_self_attention_token_major_eager_and_compiled(sage_recorder, monkeypatch, compile):
    x = tiny_inputs()
    expected = tiny_model()(**x)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = apply_speed_options(tiny_model(), SpeedOptions(attention="sage2", compile=compile))
    torch.testing.assert_close(model(**x), expected, rtol=1e-5, atol=1e-5)
    assert len(sage_recorder) == TINY_CONFIG["num_layers"]  # self-attention only, every block
    assert {(layout, causal) for _, layout, causal in sage_recorder} == {("NHD", False)}
    assert {shape[2:] for shape, _, _ in sage_recorder} == {(TINY_CONFIG["num_attention_heads"],
                                                             TINY_CONFIG["attention_head_dim"])}
    if compile:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()


def test_sage2_without_the_package_or_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sageattention", None)
    with pytest.raises(RuntimeError, match=r"attention=sage2: SageAttention 2 .* runs on CUDA GPUs only and the model "
                                           r"is on cpu"):
        resolve_kernel("sage2", probe_kernel_facts(torch.device("cpu")), [])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    with pytest.raises(RuntimeError, match=r"attention=sage2 needs SageAttention 2.*thu-ml/SageAttention.*"
                                           r"TORCH_CUDA_ARCH_LIST=9.0"):
        resolve_kernel("sage2", probe_kernel_facts(torch.device("cuda")), [])


@pytest.mark.parametrize("capability, installed, expected", [
    ((9, 0), True, "sage2"), ((8, 0), True, "sage2"), ((7, 5), True, "cudnn"), ((9, 0), False, "cudnn")])
def test_auto_8bit_takes_sage2_where_it_runs_else_auto(sage_recorder, monkeypatch, capability, installed, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", None)  # no FA4: auto is cuDNN
    if not installed:
        monkeypatch.setitem(sys.modules, "sageattention", None)
    notes = []
    assert resolve_kernel("auto_8bit", probe_kernel_facts(torch.device("cuda")), notes) == expected
    assert bool(notes) == (expected != "sage2")
    notes = []
    assert resolve_kernel("auto_8bit", DeviceFacts(type="cpu"), notes) == "cudnn"
    assert "not sage2 (SageAttention 2" in notes[0] and "runs on CUDA GPUs only" in notes[0]


@pytest.mark.parametrize("preset, attention, precision, cache", [
    (None, "auto", "dtype", "none"),
    ("exact", "auto", "dtype", "none"),
    ("fast", "auto_8bit", "auto_fp8", "none"),
    ("fastest", "auto_8bit", "auto_fp8", "magcache"),
])
def test_speed_presets_resolve_to_their_documented_options(preset, attention, precision, cache):
    overrides = ["model=bindweave_14b", "data.meta_path=meta.json"] + ([f"speed={preset}"] if preset else [])
    job = settings_of(compose_config("generate", overrides))
    assert (job.model.attention_kernel, job.model.linear_precision, job.cache.kind) == (attention, precision, cache)
    assert job.cache.calibration is None and job.cache.threshold is None  # the published defaults
    # The model preset's own speed options stay.
    assert job.model.fuse_projections and job.model.compile
    # A user's override still wins over the preset.
    job = settings_of(compose_config("generate", [*overrides, "model.attention_kernel=cudnn", "cache.kind=teacache"]))
    assert (job.model.attention_kernel, job.cache.kind) == ("cudnn", "teacache")
