"""Full-size job benchmark, through the README's own commands: random checkpoints written to local
disk in the real layouts, then

- stage 3: a one-sample job (3 references, random Qwen states of the real width) through
  `python launch/generate.py model=bindweave_14b model.dit=... model.wan=... data.meta_path=...
  data.image_root=... output_dir=...` exactly as a user runs it (only size and steps set, plus any
  `overrides`); the numbers come from the sample's sidecar;
- stage 2: the built-in cases through `python launch/extract.py qwen=qwen2_5_vl_7b qwen.path=...`;
  the numbers come from the run's result record.

Each runs on the whole GPU and under each `gpu_memory_gib` cap (as on a smaller card, the user's
own setting). See conf/bench_job.yaml."""

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from bindweave.io.inputs import save_hidden_states
from bindweave.io.outputs import write_json
from bindweave.testing.demo_cases import write_demo_cases
from bindweave.testing.fullsize import write_fullsize_models, write_fullsize_qwen

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
    from bindweave.sampling.step_cache import StepCache
    from bindweave.settings.sampling import CacheSettings

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
    """``launch/bench_job.py`` (conf/bench_job.yaml): per ``stages`` entry, the README command once per
    ``speeds`` preset (stage 3) and per ``gpu_memory_gib`` cap (null: the whole GPU), on the same
    checkpoints; a capped run is compared with the uncapped one of the same preset (in this call)."""
    root = Path(cfg.root)
    report = {"device": torch.cuda.get_device_name(), "runs": {}}
    jobs = []
    mark = time.perf_counter()
    if "extract" in cfg.stages:
        qwen = write_fullsize_qwen(root, torch.device("cuda"))
        cases = write_demo_cases(root / "cases")
        jobs += [extract_job(qwen, cases, root, cap) for cap in cfg.gpu_memory_gib]
    if "generate" in cfg.stages:
        dit, wan = write_fullsize_models(root, torch.device("cuda"))
        meta = write_job(root / "cases", cfg.qwen_tokens)
        jobs += [generate_job(cfg, dit, wan, meta, root, speed, cap) for speed in cfg.speeds for cap in cfg.gpu_memory_gib]
    report["write_checkpoints_s"] = round(time.perf_counter() - mark, 1)
    torch.cuda.empty_cache()
    for job in jobs:
        print("$ " + " ".join(job.command[1:]), flush=True)
        shutil.rmtree(job.output_dir, ignore_errors=True)  # a fresh run, not a resumed one
        mark = time.perf_counter()
        finished = subprocess.run(job.command, cwd=REPO)
        run = {"command": " ".join(job.command[1:]), "command_wall_s": round(time.perf_counter() - mark, 1),
               "exit_code": finished.returncode, "gpu_memory_gib": job.cap}
        report["runs"][job.name] = run
        if finished.returncode == 0:
            job.summarize(run, cfg.steps, report["runs"].get(job.uncapped_name) if job.cap else None)
        Path(cfg.out).write_text(json.dumps(report, indent=2, default=str))  # after every run: a stop keeps it
        print(json.dumps({key: value for key, value in run.items() if key != "sidecar"}, indent=1), flush=True)


@dataclass
class BenchJob:
    """One README command of the benchmark and how its numbers are read back."""

    name: str
    uncapped_name: str  # the same job on the whole GPU, the reference of a capped one
    cap: float | None
    command: list[str]
    output_dir: Path
    summarize: Callable[[dict, int, dict | None], None]


def run_name(stage: str, preset: str, cap: float | None) -> str:
    return f"{stage}_{preset}" + (f"_cap{cap:g}" if cap else "")


def generate_job(cfg: DictConfig, dit: Path, wan: Path, meta: Path, root: Path, speed: str, cap) -> BenchJob:
    output_dir = root / f"videos_{run_name('generate', speed, cap)}"
    command = [sys.executable, str(REPO / "launch" / "generate.py"), "model=bindweave_14b", f"model.dit={dit}",
               f"model.wan={wan}", f"data.meta_path={meta}", f"data.image_root={meta.parent}",
               f"output_dir={output_dir}", f"speed={speed}", f"sampler.num_steps={cfg.steps}",
               f"video.height={cfg.height}", f"video.width={cfg.width}", f"video.num_frames={cfg.num_frames}",
               *([f"model.gpu_memory_gib={cap}"] if cap else []), *cfg.overrides]

    def summarize(run: dict, steps: int, uncapped: dict | None) -> None:
        record = json.loads((output_dir / f"{SAMPLE_ID}.json").read_text())
        summarize_run(run, record, steps, uncapped)
        run["mp4_bytes"] = (output_dir / f"{SAMPLE_ID}.mp4").stat().st_size

    return BenchJob(run_name("generate", speed, cap), run_name("generate", speed, None), cap, command, output_dir,
                    summarize)


def extract_job(qwen: Path, cases: Path, root: Path, cap) -> BenchJob:
    """Stage 2's README command on the built-in cases (1, 2 and 3 references)."""
    output_dir = root / f"features_{run_name('extract', 'bf16', cap)}"
    command = [sys.executable, str(REPO / "launch" / "extract.py"), "qwen=qwen2_5_vl_7b", f"qwen.path={qwen}",
               f"data.meta_path={cases}", f"data.image_root={cases.parent}", f"output_dir={output_dir}",
               *([f"qwen.gpu_memory_gib={cap}"] if cap else [])]

    def summarize(run: dict, steps: int, uncapped: dict | None) -> None:
        result = json.loads((output_dir / ".hydra" / "result.data0.json").read_text())
        (rank,) = result["ranks"]
        run.update(load_qwen_s=result["load_qwen_s"], extract_s=rank["extract_s"],
                   peaks=peaks([rank]))
        # The first sample pays the kernels' first calls; the later ones are the steady cost.
        run["steady_sample_s"] = round(sum(list(rank["extract_s"].values())[1:]) / (len(rank["extract_s"]) - 1), 3)
        if uncapped and uncapped.get("steady_sample_s"):
            run["vs_uncapped"] = round(run["steady_sample_s"] / uncapped["steady_sample_s"], 3)

    return BenchJob(run_name("extract", "bf16", cap), run_name("extract", "bf16", None), cap, command, output_dir,
                    summarize)


def peaks(memory_records) -> dict:
    """The largest GPU allocated / reserved and host RSS peaks over a run's memory records."""
    return {key: max(record.get(key, 0.0) for record in memory_records)
            for key in ("gpu_peak_gib", "gpu_peak_reserved_gib", "host_peak_rss_gib")}


def summarize_run(run: dict, record: dict, steps: int, uncapped: dict | None) -> None:
    """Per-forward time, memory peaks and the projected 50-step job of one run; a capped run's
    per-forward time is compared with ``uncapped`` (the same preset on the whole GPU)."""
    timings, cache = record["timings"], record["speed"]["step_cache"]
    forwards_after_first = (cache["forwards_run"] if cache else 2 * steps) - 2
    # Steps after the first are the steady state (the first one compiles); a cached run's skipped
    # forwards cost next to nothing, so this is the cost of a computed one.
    forward_s = (timings["denoise_s"] - timings["first_step_s"]) / forwards_after_first if forwards_after_first > 0 \
        else None
    forwards_50 = forwards_in(50, record)
    overheads = timings["total_s"] - timings["denoise_s"]
    run.update(forward_s=forward_s and round(forward_s, 2), forwards_in_50_steps=forwards_50,
               projected_50_steps_s=round(timings["load_models_s"] + overheads + timings["first_step_s"]
                                          + (forwards_50 - 2) * forward_s) if forwards_50 and forward_s else None,
               peaks=peaks(record["memory"].values()), memory_plan=record["memory_options"]["dit"],
               memory=record["memory"], speed=record["speed"], timings=timings, sidecar=record)
    if uncapped and uncapped.get("forward_s") and forward_s:
        run["vs_uncapped"] = round(forward_s / uncapped["forward_s"], 3)
