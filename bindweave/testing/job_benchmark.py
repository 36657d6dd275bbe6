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


def run_job_benchmark(cfg: DictConfig) -> None:
    """``launch/bench_job.py`` (conf/bench_job.yaml)."""
    root = Path(cfg.root)
    mark = time.perf_counter()
    dit, wan = write_fullsize_models(root, torch.device("cuda"))
    report = {"device": torch.cuda.get_device_name(), "write_checkpoints_s": round(time.perf_counter() - mark, 1)}
    torch.cuda.empty_cache()
    meta = write_job(root / "cases", cfg.qwen_tokens)
    output_dir = root / "videos"
    command = [sys.executable, str(REPO / "launch" / "generate.py"), "model=bindweave_14b", f"model.dit={dit}",
               f"model.wan={wan}", f"data.meta_path={meta}", f"data.image_root={meta.parent}",
               f"output_dir={output_dir}", f"sampler.num_steps={cfg.steps}", f"video.height={cfg.height}",
               f"video.width={cfg.width}", f"video.num_frames={cfg.num_frames}", "overwrite=true", *cfg.overrides]
    print("$ " + " ".join(command[1:]), flush=True)
    mark = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    report["command"] = " ".join(command[1:])
    report["command_wall_s"] = round(time.perf_counter() - mark, 1)
    record = json.loads((output_dir / f"{SAMPLE_ID}.json").read_text())
    timings = record["timings"]
    # Steps after the first are the steady state (the first one compiles); 2 forwards each (CFG).
    step_s = ((timings["denoise_s"] - timings["first_step_s"]) / (cfg.steps - 1) if cfg.steps > 1
              else timings["first_step_s"])
    overheads = timings["total_s"] - timings["denoise_s"]
    report.update(
        steady_step_s=round(step_s, 2), forward_s=round(step_s / 2, 2),
        projected_50_steps_s=round(timings["load_models_s"] + overheads + timings["first_step_s"] + 49 * step_s),
        mp4_bytes=(output_dir / f"{SAMPLE_ID}.mp4").stat().st_size, sidecar=record)
    Path(cfg.out).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({key: value for key, value in report.items() if key != "sidecar"}, indent=1))
    print(json.dumps({key: record[key] for key in ("timings", "memory", "attention_kernels")}, indent=1))
