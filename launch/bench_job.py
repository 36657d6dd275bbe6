"""Full-size stage-3 job benchmark: random 14B checkpoints on local disk, then the real loader and
pipeline for a few steps at 720P. See conf/bench_job.yaml."""

import json
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.data import read_meta, save_hidden_states  # noqa: E402
from bindweave.demo_cases import write_demo_cases  # noqa: E402
from bindweave.fullsize import write_fullsize_models  # noqa: E402
from bindweave.outputs import write_json, write_mp4  # noqa: E402
from bindweave.pipeline import (  # noqa: E402
    ModelSettings,
    VideoSettings,
    generate_sample,
    load_stage3_models,
    memory_snapshot,
    seconds_since_process_start,
)
from bindweave.sampler import SamplerSettings  # noqa: E402


@hydra.main(config_path="../conf", config_name="bench_job", version_base="1.3")
def main(cfg: DictConfig) -> None:
    device = torch.device("cuda")
    root = Path(cfg.root)
    mark = time.perf_counter()
    dit, wan = write_fullsize_models(root, device)
    report = {"device": torch.cuda.get_device_name(), "write_checkpoints_s": time.perf_counter() - mark}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    meta = json.loads(write_demo_cases(root / "cases").read_text())
    sample_id = "demo_face_dog_house_3"  # 3 references
    states = root / "cases" / "states.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_hidden_states(states, torch.randn(1, cfg.qwen_tokens, 3584, generator=generator).bfloat16(),
                       torch.randn(1, cfg.qwen_tokens + 6, 3584, generator=generator).bfloat16(), {})
    meta = {sample_id: {**meta[sample_id], "hidden_states_path": str(states)}}
    write_json(root / "cases" / "job.json", meta)
    sample = read_meta(root / "cases" / "job.json")[0]

    started = seconds_since_process_start()
    mark = time.perf_counter()
    models = load_stage3_models(ModelSettings(
        dit=str(dit), wan=str(wan), dtype="bfloat16", device="cuda", cache_dir=str(root / "cache"),
        offload_encoders=cfg.offload_encoders, compile=cfg.compile, fuse_projections=True,
        attention_kernel=cfg.attention_kernel, vae_tiling=cfg.vae_tiling))
    report["load_models_s"] = time.perf_counter() - mark
    report["memory_after_load"] = memory_snapshot(device)
    video = VideoSettings(height=cfg.height, width=cfg.width, num_frames=cfg.num_frames)
    record = generate_sample(models, sample, video, SamplerSettings(num_steps=cfg.steps), root / "out" / "job.mp4",
                             write_video=write_mp4 if cfg.write_mp4 else lambda *args, **kwargs: None)
    report.update(sample=record, process_start_before_load_s=started)
    timings = record["timings"]
    # Steps after the first are the steady state (the first one compiles); 2 forwards each (CFG).
    step_s = (timings["denoise_s"] - timings["first_step_s"]) / (cfg.steps - 1) if cfg.steps > 1 \
        else timings["first_step_s"]
    report["forward_s"] = step_s / 2
    overheads = timings["total_s"] - timings["denoise_s"]
    report["projected_50_steps_s"] = overheads + timings["first_step_s"] + 49 * step_s
    Path(cfg.out).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({key: report[key] for key in ("device", "write_checkpoints_s", "load_models_s",
                                                  "memory_after_load", "forward_s", "projected_50_steps_s")}, default=str))
    print(json.dumps({"timings": record["timings"], "memory": record["memory"]}, indent=1))


if __name__ == "__main__":
    main()
