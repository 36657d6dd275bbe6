"""Full-size job benchmark, through the README's own commands: random checkpoints written to local
disk in the real layouts, then

- stage 3: a one-sample job (3 references, random Qwen states of the real width) through
  `python launch/generate.py model=bindweave_14b model.dit=... model.wan=... data.meta_path=...
  data.image_root=... output_dir=...` exactly as a user runs it (only size and steps set, plus any
  `overrides`); the numbers come from the sample's sidecar;
- stage 2: the built-in cases through `python launch/extract.py qwen=qwen2_5_vl_7b qwen.path=...`;
  the numbers come from the run's result record.

Each runs on the whole GPU and under each `gpu_memory_gib` cap (as on a smaller card, the user's
own setting); stage 3 also with each `loras` entry (a random LoRA of that rank in LightX2V's I2V
distill layout, given as `model.loras=[{path: ..., strength: 1.0}]`). See conf/bench_job.yaml."""

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
from bindweave.testing.lora import write_lightx2v_style_lora

REPO = Path(__file__).resolve().parents[2]

SAMPLE_ID = "demo_face_dog_house_3"  # 3 references
QWEN_WIDTH = 3584  # Qwen2.5-VL-7B's hidden size, what the 14B DiT's text projector takes


def write_job(folder: Path, qwen_tokens: int, qwen_width: int = QWEN_WIDTH) -> Path:
    """One demo case with random hidden states; returns its meta JSON (images relative to ``folder``)."""
    meta = json.loads(write_demo_cases(folder).read_text())
    generator = torch.Generator().manual_seed(0)
    states = folder / "states.safetensors"
    save_hidden_states(states, torch.randn(1, qwen_tokens, qwen_width, generator=generator).bfloat16(),
                       torch.randn(1, qwen_tokens + 6, qwen_width, generator=generator).bfloat16(), {})
    path = folder / "job.json"
    write_json(path, {SAMPLE_ID: {**meta[SAMPLE_ID], "hidden_states_path": states.name}})
    return path


def write_lora(folder: Path, dit: Path, rank: int) -> Path:
    """A random LoRA of ``rank`` for the DiT in ``dit``, in LightX2V's I2V distill layout (every block's
    linear pairs and bias deltas, norm and modulation deltas); written once per rank."""
    from bindweave.model.loading import parameter_shapes

    path = folder / f"lightx2v_style_rank{rank}.safetensors"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        write_lightx2v_style_lora(partial, parameter_shapes(dit), rank=rank)
        partial.rename(path)
    return path


def full_schedule_steps(sidecar: dict) -> int:
    """Steps of the video a user of this preset gets: a distilled schedule's own list, else 50."""
    return len(sidecar["timesteps"]) or 50


def forwards_in(steps: int, sidecar: dict) -> int:
    """DiT forwards a ``steps``-step run of this sidecar's settings computes: one per CFG pass per step
    (1 without guidance, else 2), less what its step cache skips. MagCache decides from its
    calibration alone, so the count is exact; TeaCache decides from the model's timestep
    embeddings, so it is not known here (None)."""
    from bindweave.sampling.sampler import SIDES, Step
    from bindweave.sampling.step_cache import StepCache
    from bindweave.settings.sampling import NO_GUIDANCE, CacheSettings

    sides = SIDES[:1] if sidecar["guidance_scale"] == NO_GUIDANCE else SIDES
    settings = sidecar["recipe"]["model_options"].get("cache")
    if settings is None:
        return steps * len(sides)
    if settings["kind"] != "magcache":
        return None
    cache = StepCache(CacheSettings(**settings), steps)
    tokens = torch.zeros(1)
    for index in range(steps):
        for side in sides:
            cache.for_step(Step(index, steps, torch.zeros(1), side))(lambda t: t + 1, tokens, tokens)
    return cache.record()["forwards_run"]


def run_job_benchmark(cfg: DictConfig) -> None:
    """``launch/bench_job.py`` (conf/bench_job.yaml): per ``stages`` entry, the README command once per
    ``speeds`` preset x ``loras`` rank (stage 3) x ``gpu_memory_gib`` cap (null: the whole GPU), on the
    same checkpoints; a capped run is compared with the uncapped one, a LoRA run with the one without
    (the same preset otherwise, in this call)."""
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
        loras = {rank: write_lora(root / "loras", dit, rank) for rank in cfg.loras if rank}
        jobs += [generate_job(cfg, dit, wan, meta, root, speed, cap, loras.get(rank), rank)
                 for speed in cfg.speeds for rank in cfg.loras for cap in cfg.gpu_memory_gib]
    report["write_checkpoints_s"] = round(time.perf_counter() - mark, 1)  # LoRAs included
    torch.cuda.empty_cache()
    run_jobs(jobs, report, Path(cfg.out))


def run_jobs(jobs: list["BenchJob"], report: dict, out: Path) -> None:
    """Each job's README command, fresh (no resume), in order; the report is written after every run,
    so a stopped benchmark keeps what it measured."""
    out.write_text(json.dumps(report, indent=2, default=str))
    for job in jobs:
        print("$ " + " ".join(job.command[1:]), flush=True)
        shutil.rmtree(job.output_dir, ignore_errors=True)  # a fresh run, not a resumed one
        mark = time.perf_counter()
        finished = subprocess.run(job.command, cwd=REPO)
        run = {"command": " ".join(job.command[1:]), "command_wall_s": round(time.perf_counter() - mark, 1),
               "exit_code": finished.returncode, "gpu_memory_gib": job.cap}
        report["runs"][job.name] = run
        if finished.returncode == 0:
            job.summarize(run, {ratio: report["runs"].get(name) for ratio, name in job.references.items()})
        out.write_text(json.dumps(report, indent=2, default=str))
        print(json.dumps({key: value for key, value in run.items() if key != "sidecar"}, indent=1), flush=True)


@dataclass
class BenchJob:
    """One README command of the benchmark and how its numbers are read back."""

    name: str
    # The runs this one is compared with, by the ratio's name: the same job on the whole GPU
    # (``vs_uncapped``) for a capped one, without its LoRA (``vs_no_lora``) for one with a LoRA.
    references: dict[str, str]
    cap: float | None
    command: list[str]
    output_dir: Path
    summarize: Callable[[dict, dict], None]


def run_name(stage: str, preset: str, cap: float | None, lora_rank: int | None = None) -> str:
    return f"{stage}_{preset}" + (f"_lora{lora_rank}" if lora_rank else "") + (f"_cap{cap:g}" if cap else "")


def generate_job(cfg: DictConfig, dit: Path, wan: Path, meta: Path, root: Path, speed: str, cap,
                 lora: Path | None = None, lora_rank: int | None = None) -> BenchJob:
    """Stage 3's README command for one preset, cap and LoRA file (of rank ``lora_rank``) or none."""
    name = run_name("generate", speed, cap, lora_rank)
    output_dir = root / f"videos_{name}"
    command = [sys.executable, str(REPO / "launch" / "generate.py"), "model=bindweave_14b", f"model.dit={dit}",
               f"model.wan={wan}", f"data.meta_path={meta}", f"data.image_root={meta.parent}",
               f"output_dir={output_dir}", f"speed={speed}", f"sampler.num_steps={cfg.steps}",
               f"video.height={cfg.height}", f"video.width={cfg.width}", f"video.num_frames={cfg.num_frames}",
               *([f"model.loras=[{{path: {lora}, strength: 1.0}}]"] if lora else []),
               *([f"model.gpu_memory_gib={cap}"] if cap else []), *cfg.overrides]
    references = {"vs_uncapped": run_name("generate", speed, None, lora_rank)} if cap else {}
    if lora:
        references["vs_no_lora"] = run_name("generate", speed, cap)

    def summarize(run: dict, measured: dict) -> None:
        record = json.loads((output_dir / f"{SAMPLE_ID}.json").read_text())
        summarize_run(run, record, measured)
        run["mp4_bytes"] = (output_dir / f"{SAMPLE_ID}.mp4").stat().st_size

    return BenchJob(name, references, cap, command, output_dir, summarize)


def extract_job(qwen: Path, cases: Path, root: Path, cap) -> BenchJob:
    """Stage 2's README command on the built-in cases (1, 2 and 3 references)."""
    output_dir = root / f"features_{run_name('extract', 'bf16', cap)}"
    command = [sys.executable, str(REPO / "launch" / "extract.py"), "qwen=qwen2_5_vl_7b", f"qwen.path={qwen}",
               f"data.meta_path={cases}", f"data.image_root={cases.parent}", f"output_dir={output_dir}",
               *([f"qwen.gpu_memory_gib={cap}"] if cap else [])]

    def summarize(run: dict, measured: dict) -> None:
        uncapped = measured.get("vs_uncapped")
        result = json.loads((output_dir / ".hydra" / "result.data0.json").read_text())
        (rank,) = result["ranks"]
        run.update(load_qwen_s=result["load_qwen_s"], extract_s=rank["extract_s"],
                   peaks=peaks([rank]))
        # The first sample pays the kernels' first calls; the later ones are the steady cost.
        run["steady_sample_s"] = round(sum(list(rank["extract_s"].values())[1:]) / (len(rank["extract_s"]) - 1), 3)
        if uncapped and uncapped.get("steady_sample_s"):
            run["vs_uncapped"] = round(run["steady_sample_s"] / uncapped["steady_sample_s"], 3)

    references = {"vs_uncapped": run_name("extract", "bf16", None)} if cap else {}
    return BenchJob(run_name("extract", "bf16", cap), references, cap, command, output_dir, summarize)


def peaks(memory_records) -> dict:
    """The largest GPU allocated / reserved and host RSS peaks over a run's memory records."""
    return {key: max(record.get(key, 0.0) for record in memory_records)
            for key in ("gpu_peak_gib", "gpu_peak_reserved_gib", "host_peak_rss_gib")}


def summarize_run(run: dict, record: dict, references: dict) -> None:
    """Per-forward time, memory peaks and the projected video of one run (its preset's full schedule:
    50 steps, or a distilled schedule's own list); its per-forward time over each run in
    ``references`` (ratio name -> that run's summary, None where it did not run)."""
    timings = record["timings"]
    passes = forwards_in(1, record)  # the first step's forwards (a step cache never skips the first)
    forwards_run = forwards_in(record["num_steps"], record)
    # Steps after the first are the steady state (the first one compiles); a cached run's skipped
    # forwards cost next to nothing, so this is the cost of a computed one.
    forward_s = (timings["denoise_s"] - timings["first_step_s"]) / (forwards_run - passes) \
        if forwards_run and forwards_run > passes else None
    full_steps = full_schedule_steps(record)
    forwards_full = forwards_in(full_steps, record)
    overheads = timings["total_s"] - timings["denoise_s"]
    # Four decimals: a tiny model's forward on the CPU is milliseconds, and the ratios below use it.
    run.update(forward_s=forward_s and round(forward_s, 4), forwards_run=forwards_run,
               full_schedule_steps=full_steps, forwards_in_full_schedule=forwards_full,
               projected_video_s=round(timings["load_models_s"] + overheads + timings["first_step_s"]
                                       + (forwards_full - passes) * forward_s) if forwards_full and forward_s else None,
               lora_merge_s=timings.get("lora_merge_s"),
               peaks=peaks(record["memory"].values()), memory_plan=record["memory_options"]["dit"],
               memory=record["memory"], speed=record["speed"], timings=timings, sidecar=record)
    for ratio, reference in references.items():
        if reference and reference.get("forward_s") and forward_s:
            run[ratio] = round(forward_s / reference["forward_s"], 3)
