"""The settings schema (bindweave/app/config.py): every preset composes into settings objects, and a bad
key or value fails before anything loads with one line naming the key, where it came from and the fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bindweave.app.config import (
    CONF_DIR,
    ExtractConfig,
    GenerateConfig,
    RefineConfig,
    check_command_line,
    compose_config,
    settings_of,
)
from bindweave.errors import BindWeaveInputError
from bindweave.settings.model import ModelSettings
from bindweave.settings.refine import EndpointSettings, LocalSettings
from bindweave.settings.parallel import ParallelSettings
from parallel.layout import ParallelLayout
from bindweave.app.build import attention_sites
from parallel_launch import REPO, plain_env

ENTRY_POINTS = {"generate": (GenerateConfig, ["model", "sampler", "video", "data", "parallel"]),
                "extract": (ExtractConfig, ["qwen", "data"]),
                "refine": (RefineConfig, ["qwen", "data", "refiner"])}
# What a preset needs besides itself to make a whole job (the README's real-run shape).
REQUIRED = {"refiner=openai": ["refiner.model=gpt-4o"]}
REAL_MODEL = ["model=bindweave_14b", "data.meta_path=meta.json"]


def presets(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


CASES = [(entry, group, preset) for entry, (_, groups) in ENTRY_POINTS.items() for group in groups
         for preset in presets(group)]


@pytest.mark.parametrize("entry, group, preset", CASES, ids=[f"{e}-{g}={p}" for e, g, p in CASES])
def test_every_preset_of_every_group_builds_its_settings(entry, group, preset):
    schema, _ = ENTRY_POINTS[entry]
    choice = f"{group}={preset}"
    extra = ([] if entry != "generate" else ["data.meta_path=meta.json"] if group == "model" else REAL_MODEL)
    job = settings_of(compose_config(entry, [choice, *extra, *REQUIRED.get(choice, [])]))
    assert isinstance(job, schema)
    if entry == "generate":
        assert isinstance(job.model, ModelSettings) and isinstance(job.parallel, ParallelSettings)
    if entry == "refine":
        assert isinstance(job.refiner, EndpointSettings if preset == "openai" else LocalSettings)


def test_the_real_preset_sets_the_release_weights_at_model_level():
    """The preset's keys land at model.* (the bug this guards against nested them at model.model.*)."""
    job = settings_of(compose_config("generate", REAL_MODEL))
    assert (job.model.dit, job.model.wan) == ("ByteDance/BindWeave", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers")
    assert job.model.compile and job.model.fuse_projections and job.model.dtype == "bfloat16"
    assert job.model.tiny_root is None
    assert settings_of(compose_config("extract", ["qwen=qwen2_5_vl_7b"])).qwen.path == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_presets_only_override_the_schema_defaults():
    """A preset that repeats a default would be a second source of it."""
    default = settings_of(compose_config("generate", REAL_MODEL))
    assert default.sampler == type(default.sampler)() and default.video == type(default.video)()
    assert default.parallel == ParallelSettings(auto=True)


def error_of(config_name: str, *args: str) -> str:
    with pytest.raises(BindWeaveInputError) as caught:
        check_command_line(config_name, list(args))
    return str(caught.value)


def test_a_typo_in_an_override_names_the_key_the_override_and_the_fix():
    message = error_of("generate", *REAL_MODEL, "model.attention_kernal=fa4")
    assert message == ("unknown setting model.attention_kernal (command-line override model.attention_kernal=fa4): "
                       "did you mean model.attention_kernel?")


def test_a_misplaced_key_points_at_its_group():
    assert "did you mean sampler.seed?" in error_of("generate", *REAL_MODEL, "model.seed=7")
    assert "did you mean qwen.path?" in error_of("extract", "qwen.pth=weights/Qwen")
    assert "did you mean sampler.seed?" in error_of("generate", *REAL_MODEL, "+sampler.sed=1")


@pytest.fixture
def conf_copy(tmp_path, monkeypatch) -> Path:
    """A copy of conf/ that the checks read instead of the real one."""
    copy = tmp_path / "conf"
    shutil.copytree(CONF_DIR, copy)
    monkeypatch.setattr("bindweave.app.config.CONF_DIR", copy)
    return copy


def test_a_typo_in_a_preset_file_names_the_file(conf_copy):
    preset = conf_copy / "model" / "bindweave_14b.yaml"
    preset.write_text(preset.read_text() + "  attention_kernal: fa4\n")
    message = error_of("generate", *REAL_MODEL)
    assert message == ("unknown setting model.attention_kernal in conf/model/bindweave_14b.yaml: "
                       "did you mean model.attention_kernel?")


def test_a_preset_nested_one_level_too_deep_is_explained(conf_copy):
    """The original bug: conf/model/bindweave_14b.yaml without its package line."""
    preset = conf_copy / "model" / "bindweave_14b.yaml"
    preset.write_text(preset.read_text().replace("# @package _global_\n", ""))
    message = error_of("generate", *REAL_MODEL)
    assert message.startswith("unknown setting model.model in conf/model/bindweave_14b.yaml")
    assert "one level too deep" in message


@pytest.mark.parametrize("override, expected", [
    ("model.attention_kernel=fa5", "model.attention_kernel=fa5 is not one of cudnn, flash, efficient, default, fa4, sage2, auto, auto_8bit"),
    ("model.dtype=bf16", "model.dtype=bf16 is not one of bfloat16, float16, float32"),
    ("model.device=gpu", "model.device=gpu is not auto, cpu, cuda or cuda:N"),
    ("parallel.backend=nccl", "parallel.backend=nccl is not one of auto, xfuser, deepspeed"),
    ("parallel.fsdp_scope=node", "parallel.fsdp_scope=node is not one of group, sequence, world"),
    ("on_error=maybe", "on_error=maybe: use on_error=fail or on_error=skip"),
    ("parallel=ulyses2", "parallel=ulyses2: there is no conf/parallel/ulyses2.yaml (did you mean ulysses2?); "
                         "choose one of auto, cfg2"),
    ("sampler.num_steps=0", "sampler.num_steps=0 must be > 0"),
    ("video.height=0", "video.height=0 must be >= 1"),
    ("video.height=50", "video.height=50 / video.width=1280: both must be multiples of 16"),
    ("sampler.guidance_scale=abc", "sampler.guidance_scale (command-line override sampler.guidance_scale=abc): "
                                   "Value 'abc' of type 'str' could not be converted to Float"),
])
def test_bad_values_are_refused_with_the_allowed_ones(override, expected):
    assert expected in error_of("generate", *REAL_MODEL, override)


def test_stage_1_and_2_values_are_checked_too():
    assert "qwen.dtype=fp8 is not one of auto, bfloat16" in error_of("extract", "qwen.dtype=fp8")
    assert error_of("refine", "refiner=openai") == "refiner.model is not set: pass refiner.model=..."
    assert "not an http(s) URL" in error_of("refine", "refiner=openai", "refiner.model=m", "refiner.base_url=ftp://x")
    assert "model.dit and model.wan must name the weights" in error_of("generate", "model.tiny_root=null",
                                                                       "data.meta_path=m.json")


def test_every_job_of_a_sweep_is_checked():
    check_command_line("generate", ["-m", "sampler.seed=1,2", "model=tiny,bindweave_14b", "data.meta_path=m.json"])
    message = error_of("generate", "-m", "sampler.seed=1,2", "model=tiny,bindweave_15b")
    assert message.startswith("model=bindweave_15b: there is no conf/model/bindweave_15b.yaml (did you mean bindweave_14b?)")


def test_the_entry_point_prints_one_error_line_exits_2_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), *REAL_MODEL,
                             "model.attention_kernal=fa4", f"output_dir={tmp_path / 'videos'}"],
                            cwd=tmp_path, env=plain_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: unknown setting model.attention_kernal (command-line override "
                                     "model.attention_kernal=fa4): did you mean model.attention_kernel?")
    assert list(tmp_path.iterdir()) == []


# ---- speed options tell the truth about the layout -------------------------------------------------


def test_the_kernel_report_names_what_runs_at_each_call_site():
    single = attention_sites("fa4", ParallelLayout(), "cuda", "bfloat16")
    assert single == {"self_attention": "FlashAttention-4 (flash-attn-4)",
                      "cross_attention": "SDPA, PyTorch's own kernel order (every rank, whole context)"}
    fsdp = attention_sites("cudnn", ParallelLayout(cfg=2, fsdp=("dit",)), "cuda", "bfloat16")
    assert fsdp["self_attention"] == "SDPA, cuDNN first"  # FSDP shards weights; the kernel hook stays
    # The default backend on CUDA is deepspeed's Ulysses: the chosen kernel runs each rank's heads.
    ulysses = attention_sites("fa4", ParallelLayout(ulysses=2), "cuda", "bfloat16")
    assert ulysses["self_attention"] == ("deepspeed sequence parallel (ring=1 x ulysses=2), rank-local "
                                         "FlashAttention-4 (flash-attn-4)")
    ring = attention_sites("fa4", ParallelLayout(ring=2), "cuda", "bfloat16")  # ring attention: xfuser's USP
    assert ring["self_attention"] == "xfuser sequence parallel (ring=2 x ulysses=1), rank-local SDPA, cuDNN first"
    cpu = attention_sites("efficient", ParallelLayout(ulysses=2), "cpu", "float32")
    assert cpu["self_attention"] == "deepspeed sequence parallel (ring=1 x ulysses=2), rank-local SDPA, memory-efficient first"


def test_an_unknown_kernel_fails_before_loading_with_any_compile_setting():
    for compile_blocks in ("true", "false"):
        message = error_of("generate", *REAL_MODEL, "model.attention_kernel=flash4", f"model.compile={compile_blocks}")
        assert "model.attention_kernel=flash4 is not one of" in message


def test_cfg_job_prints_the_resolved_settings():
    """The README's way to see every key: `python launch/generate.py --cfg job [overrides]`."""
    result = subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), "--cfg", "job", *REAL_MODEL],
                            cwd=REPO, env=plain_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dit: ByteDance/BindWeave" in result.stdout and "attention_kernel: auto" in result.stdout
