"""The full-size job benchmark (bindweave/testing/job_benchmark.py) on the tiny set, on the CPU: its
README commands run as users type them, with and without a LoRA and in the draft mode, and the
numbers it reads back from the sidecars (forwards counted, the merge timed, the full video projected)."""

import json
from pathlib import Path

from omegaconf import OmegaConf

from bindweave.model.transformer import TINY_CONFIG
from bindweave.testing.job_benchmark import generate_job, run_jobs, write_job, write_lora
from bindweave.testing.tiny import write_tiny_models

CPU_SIZE = {"steps": 2, "height": 48, "width": 64, "num_frames": 5,
            "overrides": ["model.compile=false", "progress=false"]}


def test_job_benchmark_counts_forwards_times_the_merge_and_projects_the_video(tmp_path):
    tiny = write_tiny_models(tmp_path / "tiny")
    meta = write_job(tmp_path / "cases", qwen_tokens=7, qwen_width=TINY_CONFIG["mllm_dim"])
    lora = write_lora(tmp_path / "loras", tiny.bindweave, rank=4)
    assert write_lora(tmp_path / "loras", tiny.bindweave, rank=4) == lora  # written once per rank
    cfg = OmegaConf.create(CPU_SIZE)
    jobs = [generate_job(cfg, tiny.bindweave, tiny.wan, meta, tmp_path, "fast", None),
            generate_job(cfg, tiny.bindweave, tiny.wan, meta, tmp_path, "fast", None, lora, 4),
            generate_job(cfg, tiny.bindweave, tiny.wan, meta, tmp_path, "draft", None, lora, 4)]
    assert [job.name for job in jobs] == ["generate_fast", "generate_fast_lora4", "generate_draft_lora4"]
    assert f"model.loras=[{{path: {lora}, strength: 1.0}}]" in jobs[2].command
    report = {"device": "cpu", "runs": {}}
    run_jobs(jobs, report, tmp_path / "bench_job.json")
    assert json.loads((tmp_path / "bench_job.json").read_text())["runs"].keys() == report["runs"].keys()
    fast, fast_lora, draft = (report["runs"][job.name] for job in jobs)
    assert [run["exit_code"] for run in (fast, fast_lora, draft)] == [0, 0, 0]

    # UniPC with CFG: 2 steps x 2 passes run, the user's video is 50 steps x 2.
    assert (fast["forwards_run"], fast["full_schedule_steps"], fast["forwards_in_full_schedule"]) == (4, 50, 100)
    assert fast["lora_merge_s"] is None and "vs_no_lora" not in fast
    assert fast_lora["lora_merge_s"] > 0 and fast_lora["vs_no_lora"] > 0
    assert fast_lora["sidecar"]["plan"]["loras"][0]["path"] == str(lora)
    # The draft runs its whole distilled schedule (4 steps, one forward each, whatever num_steps
    # says), so its projection is the run itself.
    assert (draft["forwards_run"], draft["full_schedule_steps"], draft["forwards_in_full_schedule"]) == (4, 4, 4)
    timings = draft["timings"]
    assert abs(draft["projected_video_s"] - (timings["load_models_s"] + timings["total_s"])) <= 1
    assert draft["forward_s"] == round((timings["denoise_s"] - timings["first_step_s"]) / 3, 4)
    for run in (fast, fast_lora, draft):
        assert Path(run["sidecar"]["images"][0]).exists() and run["mp4_bytes"] > 0
