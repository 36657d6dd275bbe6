"""Full-size stage-3 job benchmark, through the README's own command: random 14B checkpoints written
to local disk in the real layouts, a one-sample job (3 references, random Qwen states of the real
width), then `python launch/generate.py model=bindweave_14b model.dit=... model.wan=... data.meta_path=...
data.image_root=... output_dir=...` exactly as a user runs it (only size and steps set, plus any
`overrides`). The numbers come from the sample's sidecar. See conf/bench_job.yaml."""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from bindweave.io.inputs import save_hidden_states
from bindweave.io.outputs import write_json
from bindweave.testing.demo_cases import write_demo_cases
from bindweave.testing.fullsize import write_fullsize_models

REPO = Path(__file__).resolve().parents[2]

SAMPLE_ID = "demo_face_dog_house_3"  # 3 references
QWEN_WIDTH = 3584  # Qwen2.5-VL-7B's hidden size, what the 14B DiT's text projector takes


def write_job(folder: Path, qwen_tokens: int) -> Path:
    """One demo case with random hidden states; returns its meta JSON (images relative to ``folder``)."""
    meta = json.loads(write_demo_cases(folder).read_text())
    generator = torch.Generator().manual_seed(0)
    states = folder / "states.safetensors"
    save_hidden_states(states, torch.randn(1, qwen_tokens, QWEN_WIDTH, generator=generator).bfloat16(),
                       torch.randn(1, qwen_tokens + 6, QWEN_WIDTH, generator=generator).bfloat16(), {})
    path = folder / "job.json"
    write_json(path, {SAMPLE_ID: {**meta[SAMPLE_ID], "hidden_states_path": states.name}})
    return path


def forwards_in(steps: int, sidecar: dict) -> int:
    """DiT forwards a ``steps``-step run of this sidecar's settings computes: 2 per step, less what
    its step cache skips. MagCache decides from its calibration alone, so the count is exact;
    TeaCache decides from the model's timestep embeddings, so it is not known here (None)."""
    from bindweave.sampling.sampler import SIDES, Step
    from bindweave.sampling.step_cache import CacheSettings, StepCache

    settings = sidecar["recipe"]["model_options"].get("cache")
    if settings is None:
        return 2 * steps
    if settings["kind"] != "magcache":
        return None
    cache = StepCache(CacheSettings(**settings), steps)
    tokens = torch.zeros(1)
    for index in range(steps):
        for side in SIDES:
            cache.for_step(Step(index, steps, torch.zeros(1), side))(lambda t: t + 1, tokens, tokens)
    return cache.record()["forwards_run"]


def run_job_benchmark(cfg: DictConfig) -> None:
    """``launch/bench_job.py`` (conf/bench_job.yaml): the README command once per ``speeds`` preset."""
    root = Path(cfg.root)
    mark = time.perf_counter()
    dit, wan = write_fullsize_models(root, torch.device("cuda"))
    report = {"device": torch.cuda.get_device_name(), "write_checkpoints_s": round(time.perf_counter() - mark, 1),
              "runs": {}}
    torch.cuda.empty_cache()
    meta = write_job(root / "cases", cfg.qwen_tokens)
    uncached_forward_s = None
    for speed in cfg.speeds:
        output_dir = root / f"videos_{speed}"
        command = [sys.executable, str(REPO / "launch" / "generate.py"), "model=bindweave_14b", f"model.dit={dit}",
                   f"model.wan={wan}", f"data.meta_path={meta}", f"data.image_root={meta.parent}",
                   f"output_dir={output_dir}", f"speed={speed}", f"sampler.num_steps={cfg.steps}",
                   f"video.height={cfg.height}", f"video.width={cfg.width}", f"video.num_frames={cfg.num_frames}",
                   "overwrite=true", *cfg.overrides]
        print("$ " + " ".join(command[1:]), flush=True)
        mark = time.perf_counter()
        finished = subprocess.run(command, cwd=REPO)
        run = {"command": " ".join(command[1:]), "command_wall_s": round(time.perf_counter() - mark, 1),
               "exit_code": finished.returncode}
        report["runs"][speed] = run
        if finished.returncode == 0:
            uncached_forward_s = summarize_run(run, json.loads((output_dir / f"{SAMPLE_ID}.json").read_text()),
                                               cfg.steps, uncached_forward_s)
            run["mp4_bytes"] = (output_dir / f"{SAMPLE_ID}.mp4").stat().st_size
        Path(cfg.out).write_text(json.dumps(report, indent=2, default=str))  # after every run: a stop keeps it
        print(json.dumps({key: value for key, value in run.items() if key != "sidecar"}, indent=1), flush=True)


def summarize_run(run: dict, record: dict, steps: int, uncached_forward_s: float | None) -> float | None:
    """Per-forward time and the projected 50-step job of one run; returns the per-forward time of
    an uncached run (a cached run's computed forwards cost the same, its own few may be none)."""
    timings, cache = record["timings"], record["speed"]["step_cache"]
    forwards_after_first = (cache["forwards_run"] if cache else 2 * steps) - 2
    # Steps after the first are the steady state (the first one compiles).
    forward_s = (timings["denoise_s"] - timings["first_step_s"]) / forwards_after_first if forwards_after_first > 0 \
        else None
    if cache is None:
        uncached_forward_s = forward_s
    per_forward = forward_s if cache is None else uncached_forward_s
    forwards_50 = forwards_in(50, record)
    overheads = timings["total_s"] - timings["denoise_s"]
    run.update(forward_s=forward_s and round(forward_s, 2), forwards_in_50_steps=forwards_50,
               projected_50_steps_s=round(timings["load_models_s"] + overheads + timings["first_step_s"]
                                          + (forwards_50 - 2) * per_forward) if forwards_50 and per_forward else None,
               peak_memory_gib=record["peak_memory_gib"], memory=record["memory"], speed=record["speed"],
               timings=timings, sidecar=record)
    return uncached_forward_s
