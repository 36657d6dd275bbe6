"""The build plan (bindweave/app/build.py): every choice settled once, every refusal before a loader
runs, the sidecar states the plan, and every command builds through the same door."""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from bindweave.app.build import BuildRequest, plan_build
from bindweave.app.config import compose_config
from bindweave.errors import BindWeaveInputError
from bindweave.model.kernels import AUTO_PREFERENCES, KERNELS, DeviceFacts, resolve_kernel
from bindweave.settings.model import ATTENTION_CHOICES, ModelSettings, VideoSettings
from bindweave.settings.sampling import SamplerSettings
from bindweave.stages.job import Stage3Job
from parallel.distributed import Processes
from bindweave.settings.parallel import ParallelSettings
from support.engines import TINY_VIDEO, build_engine_for, simulate_gpu

REPO = Path(__file__).resolve().parents[1]
TWO = Processes(rank=0, world_size=2, local_world_size=2)
H100 = DeviceFacts(type="cuda", name="H100", capability=(9, 0), packages=frozenset({"torchao"}), free_gib=79.0,
                   host_available_gib=200.0)


@pytest.fixture
def tiny(tiny_models, tmp_path):
    return ModelSettings(tiny_root=str(tiny_models.bindweave.parent), dtype="float32", cache_dir=str(tmp_path))


@pytest.fixture
def no_loader(monkeypatch):
    """Any loader that runs fails the test: a refusal must come from the plan alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("a loader ran before the plan refused")

    for target in ("bindweave.stages.models.load_bindweave_transformer",
                   "bindweave.stages.models.load_bindweave_to_host_buffer",
                   "bindweave.app.build.load_sharded_bindweave",
                   "bindweave.stages.models.T5TextEncoder.from_folder"):
        monkeypatch.setattr(target, refuse)


REFUSED = [  # (model overrides, parallel settings, processes, device facts, sampler, message)
    ({"linear_precision": "fp8"}, ParallelSettings(), Processes(), None, SamplerSettings(),
     "linear_precision=fp8: FP8 GEMMs need a CUDA GPU"),
    ({"attention_kernel": "sage2"}, ParallelSettings(), Processes(), None, SamplerSettings(),
     "attention=sage2: SageAttention 2 .* runs on CUDA GPUs only"),
    ({"attention_kernel": "fa4"}, ParallelSettings(), Processes(), replace(H100, capability=(8, 0)), SamplerSettings(),
     r"FlashAttention-4 .* supports compute capability 9.x/10.x"),
    ({"linear_precision": "fp8"}, ParallelSettings(cfg=2, fsdp=("dit",)), TWO, H100, SamplerSettings(),
     r"linear_precision=fp8 cannot apply with parallel.fsdp=\[dit\]"),
    ({"offload_encoders": True}, ParallelSettings(cfg=2, fsdp=("t5",)), TWO, H100, SamplerSettings(),
     r"offload_encoders=true cannot apply with parallel.fsdp=\[t5\]"),
    ({"memory": "offload"}, ParallelSettings(cfg=2, fsdp=("dit",)), TWO, H100, SamplerSettings(),
     r"model.memory=offload cannot apply with parallel.fsdp"),
    ({"attention_kernel": "flash"}, ParallelSettings(ulysses=2, backend="xfuser"), TWO, H100, SamplerSettings(),
     "model.attention_kernel=flash cannot run under sequence parallel"),
    ({"linear_precision": "fp8"}, ParallelSettings(), Processes(), replace(H100, free_gib=20.0), SamplerSettings(),
     "linear_precision=fp8 cannot apply with offloaded blocks"),
    ({}, ParallelSettings(), Processes(), replace(H100, free_gib=8.0), SamplerSettings(),
     r"model.memory=auto: this job needs .* even with the DiT's blocks offloaded"),
    ({}, ParallelSettings(cfg=2), TWO, H100, SamplerSettings(guidance_scale=1.0),
     r"parallel.cfg=2 runs the positive and negative CFG passes on separate GPU groups, but sampler.guidance_scale=1 "),
]


@pytest.mark.parametrize("model, parallel, processes, facts, sampler, message", REFUSED)
def test_every_refused_combination_is_refused_by_the_plan_alone(tiny, no_loader, monkeypatch, model, parallel,
                                                                 processes, facts, sampler, message):
    if facts is not None:
        monkeypatch.setattr("bindweave.app.build.process_device", lambda device, processes: torch.device("cuda", 0))
        monkeypatch.setattr("parallel.layout.importlib.util.find_spec", lambda name: True)  # as on a CUDA machine
    video = VideoSettings(height=720, width=1280, num_frames=161)  # offloads on a 20 GiB GPU
    with pytest.raises(BindWeaveInputError, match=message):
        plan_build(BuildRequest(replace(tiny, **model), video, parallel, sampler), processes, facts=facts)


def test_no_module_but_the_plan_decides_what_runs():
    """The loaders, the speed options and the layout raise no input error of their own: what cannot
    run was refused by the plan, which they take as it is."""
    for module in ("bindweave/stages/models.py", "bindweave/model/speed.py", "parallel/parallelize.py",
                   "bindweave/model/offload.py", "parallel/fsdp.py"):
        tree = ast.parse((REPO / module).read_text())
        raised = [ast.unparse(node.exc) for node in ast.walk(tree) if isinstance(node, ast.Raise) and node.exc]
        assert not [text for text in raised if "BindWeaveInputError" in text], (module, raised)
    # The deciding functions are called by the plan alone (the bare-DiT benchmarks aside).
    deciders = {"resolve_speed_options", "resolve_kernel", "resolve_linear_precision", "plan_memory", "plan_memory_for"}
    for path in [*REPO.glob("bindweave/**/*.py"), *REPO.glob("parallel/*.py")]:
        if path.parts[-2] == "testing" or path.name in ("build.py", "kernels.py", "memory.py", "speed.py", "fp8.py"):
            continue
        calls = {node.func.id for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert not calls & deciders, (path, calls & deciders)


def test_fallbacks_are_noted_in_the_plan(tiny):
    plan = plan_build(BuildRequest(replace(tiny, attention_kernel="auto_8bit", linear_precision="auto_fp8"),
                                   TINY_VIDEO))
    assert (plan.speed.attention, plan.speed.linear_precision) == ("cudnn", "dtype")
    assert any(note.startswith("attention=auto_8bit: not sage2") for note in plan.notes)
    assert any(note.startswith("linear_precision=auto_fp8: linears stay") for note in plan.notes)


def test_a_gpu_plan_settles_kernel_fp8_memory_loader_and_layout(tiny, monkeypatch):
    monkeypatch.setattr("bindweave.app.build.process_device", lambda device, processes: torch.device("cuda", 0))
    fast = replace(tiny, attention_kernel="auto_8bit", linear_precision="auto_fp8")
    plan = plan_build(BuildRequest(fast, VideoSettings()), Processes(), facts=H100)
    assert (plan.speed.attention, plan.fp8, plan.memory.mode, plan.dit_loader) == ("cudnn", True, "resident",
                                                                                    "resident")
    sharded = plan_build(BuildRequest(fast, VideoSettings(), ParallelSettings(cfg=2, fsdp=("dit",))), TWO, facts=H100)
    assert (sharded.dit_loader, sharded.fsdp, sharded.fp8) == ("fsdp", ("dit",), False)
    ulysses = plan_build(BuildRequest(fast, VideoSettings(), ParallelSettings(ulysses=2)), TWO, facts=H100)
    assert ulysses.attention_sites["self_attention"].startswith("deepspeed sequence parallel (ring=1 x ulysses=2)")
    # parallel=auto on 2 GPUs puts the CFG passes on two groups, unless there is no negative pass.
    auto = ParallelSettings(auto=True)
    assert plan_build(BuildRequest(fast, VideoSettings(), auto), TWO, facts=H100).layout.cfg == 2
    assert plan_build(BuildRequest(fast, VideoSettings(), auto, SamplerSettings(guidance_scale=1.0)), TWO,
                      facts=H100).layout.ulysses == 2


def test_the_sidecar_records_the_plan(tiny, tmp_path):
    engine = build_engine_for(tiny)
    job = Stage3Job.from_request("plan", "a dog", TINY_VIDEO, SamplerSettings(num_steps=2), tmp_path / "plan.mp4",
                                 images=[Image.new("RGB", (64, 48), "orange")],
                                 hidden_states=(torch.randn(1, 5, engine.plan.hidden_dim),
                                                torch.randn(1, 5, engine.plan.hidden_dim)))
    assert engine.run(job).status == "done"
    sidecar = json.loads((tmp_path / "plan.json").read_text())
    assert sidecar["plan"] == json.loads(json.dumps(engine.plan.record()))
    assert sidecar["recipe"]["model_options"] == engine.plan.recipe_options()
    assert sidecar["attention_kernels"] == engine.plan.attention_sites


def test_generate_serve_and_calibrate_build_the_same_plan(tiny_models, tmp_path, monkeypatch):
    """The three commands, in process, on a simulated 24 GiB GPU: each reaches build_engine with the
    same plan for the same settings (the memory plan included), and no weight is read."""
    from bindweave.app.calibrate import run_calibrate_command
    from bindweave.app.generate import GenerateCommand
    from bindweave.app.serve import ServeCommand

    simulate_gpu(monkeypatch, free_gib=24.0)
    plans = {}

    class Built(Exception):
        pass

    def record(name):
        def build_engine(plan, runtime, gpu_memory_gib=None):
            plans[name] = plan
            raise Built

        return build_engine

    monkeypatch.setattr("bindweave.app.generate.build_engine", record("generate"))
    monkeypatch.setattr("bindweave.app.build.build_engine", record("build"))
    monkeypatch.setenv("BINDWEAVE_API_KEYS", "sk-test-0123456789")
    common = [f"model.tiny_root={tiny_models.bindweave.parent}", f"model.cache_dir={tmp_path / 'cache'}",
              "model.device=cuda", f"data.demo_dir={tmp_path / 'demo'}", "video.height=720", "video.width=1280",
              "video.num_frames=161", "progress=false"]
    with pytest.raises(Built):
        GenerateCommand()._generate(compose_config("generate", [*common, f"output_dir={tmp_path / 'videos'}"]),
                                    Processes())
    with pytest.raises(Built):
        run_calibrate_command.__wrapped__(compose_config("calibrate", [*common, "sampler.num_steps=3",
                                                                       f"output={tmp_path / 'cal' / 'c.json'}"]))
    plans["calibrate"] = plans.pop("build")
    monkeypatch.setattr("bindweave.app.serve.replica_engine",
                        lambda plan, config, runtime, processes, channel: record("serve")(plan, runtime))
    serve = ServeCommand()
    config = compose_config("serve", [*common[:3], "video.height=720", "video.width=1280", "video.num_frames=161",
                                      "serve.max_frames=161", f"serve.state_dir={tmp_path / 'state'}"])
    front = type("NoFront", (), {"serve": staticmethod(lambda build, release: build())})  # no port, no HTTP
    monkeypatch.setattr("bindweave.app.serve.Front.open", lambda config: front)
    with pytest.raises(Built):
        serve._serve(config, Processes())
    assert plans["generate"].memory.record()["estimated_peak_gib"] > 20  # a plan for 24 GiB, not the tiny default
    assert plans["generate"] == plans["calibrate"] == plans["serve"]


def test_every_registry_kernel_is_a_setting_and_every_policy_resolves():
    assert set(ATTENTION_CHOICES) == set(KERNELS) | set(AUTO_PREFERENCES)
    for policy, order in AUTO_PREFERENCES.items():
        assert set(order) <= set(KERNELS) and resolve_kernel(policy, DeviceFacts(type="cpu"), []) == "cudnn"
    with pytest.raises(BindWeaveInputError, match="model.attention_kernel=flash4 is not one of"):
        ModelSettings(attention_kernel="flash4")


def test_from_pretrained_is_strict(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    import bindweave

    folder = tmp_path / "dit"
    shutil.copytree(tiny_models.bindweave, folder)
    weights = next(folder.glob("*.safetensors"))
    tensors = load_file(weights)
    key = next(name for name in tensors if "text_projector" in name)
    tensors[key.replace("text_projector", "text_projektor")] = tensors.pop(key)
    save_file(tensors, weights)
    assert isinstance(bindweave.BindWeaveTransformer.from_pretrained(tiny_models.bindweave),
                      bindweave.BindWeaveTransformer)
    with pytest.raises(BindWeaveInputError, match=rf"missing keys: \['{key}'\]; unexpected keys: .*text_projektor"):
        bindweave.BindWeaveTransformer.from_pretrained(folder)


def test_the_demo_rerun_with_another_seed_is_refused_not_already_done(tiny_models, tmp_path):
    from bindweave.app.generate import GenerateCommand
    from bindweave.app.hydra_support import close_run_log_files

    command = GenerateCommand()
    common = [f"model.tiny_root={tiny_models.bindweave.parent}", f"model.cache_dir={tmp_path / 'cache'}",
              f"data.demo_dir={tmp_path / 'demo'}", "video.height=48", "video.width=64", "video.num_frames=5",
              "sampler.num_steps=2", "progress=false", f"output_dir={tmp_path / 'out'}"]
    assert command(compose_config("generate", common))["exit_code"] == 0
    close_run_log_files()
    again = command(compose_config("generate", [*common, "sampler.seed=7"]))
    close_run_log_files()
    assert again["exit_code"] == 2 and "seed: 1234 -> 7" in again["error"]
