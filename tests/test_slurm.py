"""The Slurm story, tested against a REAL single-node Slurm started by the suite (tests/slurm_cluster.py).

- the project's sbatch script runs the tiny demo as 2 tasks through srun (no torchrun) and writes
  the same videos, byte for byte, as one plain process;
- `scancel` in the middle of a run leaves only complete MP4s (temp files are hidden, never mistaken
  for outputs);
- `scontrol requeue` of a running job (the 1-node script's default path: srun + torchrun, 2 gloo
  processes) resumes and finishes exactly the missing samples;
- the hydra-submitit-launcher config (conf/hydra/launcher/slurm.yaml) turns a 2-job sweep into two
  Slurm jobs that both write their outputs;
- every script passes `bash -n` and shellcheck;
- each script's documented submission (the header example after "Submit from the repository
  root:", parsed, not copied) runs as written from a folder laid out as the README's real run,
  with the real presets' repo ids resolved offline from an HF cache of the tiny models: stage 2
  (extract_1gpu.sbatch), then stage 3 (generate_1node.sbatch, generate_multinode.sbatch on one node).

Everything runs at the tiny size (48x64, 5 frames, 4 steps) on CPU with gloo.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bindweave.io.outputs import read_mp4_info
from conftest import needs_opens2v
from hf_cache import hf_env
from parallel_launch import plain_env  # tests/ is on sys.path
from slurm_cluster import slurm  # noqa: F401  (the session fixture; tests/ is on sys.path)
from test_documented_commands import tiny_hf_home  # noqa: F401  (the session fixture)
from test_documented_commands import (CPU_EXTRACT, CPU_GENERATE, MODEL_PRESET, QWEN_PRESET, case_ids,
                                      check_features, check_real_preset, check_videos, documented_folder)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "launch" / "slurm").glob("*.sbatch")) + [REPO / "launch" / "slurm" / "common.sh"]
TINY = ["sampler.num_steps=4", "video.height=48", "video.width=64", "video.num_frames=5", "progress=false"]
FRAMES = 5
# No GPUs, gloo: the CI form of the GPU scripts (command-line options override the #SBATCH ones).
CPU_JOB = ["--gpus-per-node=0", "--time=10"]


# --------------------------------------------------------------------------------------------
# static checks (no Slurm needed)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_bash_n(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "-x", str(script.relative_to(REPO))], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("rank_files, launcher_code, expected_code, expected_error", [
    # torchrun killed rank 0 after rank 1's bad setting: rank 1's code and error stand
    ({"1": "2\nunknown setting x\n"}, 1, 2, "error: unknown setting x"),
    ({"0": "0\n\n", "1": "0\n\n"}, 0, 0, ""),
    # every rank said 0 but one was lost without a word (OOM kill): the launcher's code stands
    ({"0": "0\n\n"}, 1, 1, ""),
    # the lowest failing rank wins, whatever order the files list in
    ({"10": "3\nten\n", "2": "1\ntwo\n", "0": "0\n\n"}, 1, 1, "error: two"),
])
def test_the_job_exits_with_the_first_failing_ranks_code_and_error(tmp_path, rank_files, launcher_code,
                                                                   expected_code, expected_error):
    status_file = tmp_path / ".bindweave-status-7-0"
    for rank, text in rank_files.items():
        Path(f"{status_file}.{rank}").write_text(text)
    result = subprocess.run(["bash", "-c", f'source "$1"; bw_finish {launcher_code}', "bash",
                             str(REPO / "launch/slurm/common.sh")],
                            env={"BINDWEAVE_STATUS_FILE": str(status_file), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True)
    assert (result.returncode, result.stderr.strip()) == (expected_code, expected_error)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# a shared work folder: tiny models, demo inputs, and the 1-process reference videos


SAMPLE_IDS = [f"{case}_v{v}" for case in ("demo_dog_teapot_2", "demo_face_1", "demo_face_dog_house_3")
              for v in range(3)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """cwd of every job: `.cache/` holds the tiny models and the demo inputs (hidden states included)
    before any job starts, so no two processes ever build them at once; `meta9.json` has 9 samples
    (the 3 demo cases x 3 seeds); `reference/` is what ONE process makes of them."""
    from bindweave.testing.demo import demo_meta_with_hidden_states
    from bindweave.stages.batch import RunSettings
    from support.engines import run_batch_on
    from support.engines import build_models
    from bindweave.settings.model import ModelSettings, VideoSettings
    from bindweave.settings.sampling import SamplerSettings
    from bindweave.testing.tiny import write_tiny_models

    work = tmp_path_factory.mktemp("slurm-work")
    tiny = write_tiny_models(work / ".cache" / "tiny-models")
    hidden_dim = json.loads((tiny.bindweave / "config.json").read_text())["mllm_dim"]
    demo_meta = demo_meta_with_hidden_states(work / ".cache" / "demo-cases", hidden_dim=hidden_dim,
                                             qwen_folder=tiny.qwen)
    cases = json.loads(Path(demo_meta).read_text())
    meta = {f"{case}_v{v}": {**entry, "seed": 100 + v} for case, entry in cases.items() for v in range(3)}
    assert sorted(meta) == SAMPLE_IDS
    (Path(demo_meta).parent / "meta9.json").write_text(json.dumps(meta, indent=1))
    (work / "logs").mkdir()
    # The 1-process reference, in this process (it already has torch & co. imported): the same
    # settings the entry point builds from conf/model/tiny.yaml and the overrides in TINY.
    models = build_models(ModelSettings(dit=None, wan=None, tiny_root=str(work / ".cache" / "tiny-models"),
                                              dtype="float32", device="cpu", cache_dir=str(work / ".cache" / "bindweave")))
    run = RunSettings(meta_path=Path(demo_meta).parent / "meta9.json", image_root=None,
                      output_dir=work / "reference", progress=False)
    run_batch_on(models, run, VideoSettings(height=48, width=64, num_frames=FRAMES), SamplerSettings(num_steps=4))
    assert finished(work / "reference") == set(SAMPLE_IDS)
    return work


def meta_args(work: Path, name: str = "meta9.json") -> list[str]:
    return [f"data.meta_path={work / '.cache' / 'demo-cases' / name}"]


def job_env(work: Path, **knobs: str) -> dict:
    """The knobs the sbatch scripts read (sbatch exports the submitting environment to the job)."""
    return {"BINDWEAVE_ROOT": str(REPO), "BINDWEAVE_PYTHON": sys.executable,
            "BINDWEAVE_ARGS": " ".join([*TINY, *meta_args(work)]), **knobs}


def finished(folder: Path) -> set[str]:
    """Samples with MP4 + sidecar (what a resumed run skips)."""
    return {p.stem for p in folder.glob("[!.]*.json") if p.with_suffix(".mp4").is_file()} if folder.exists() else set()


def assert_no_partial_output(folder: Path) -> list[str]:
    """Every visible MP4 decodes to all its frames and every sidecar has its MP4; returns the temp
    files left (hidden `.NAME.PID.tmp.EXT` files, which nothing ever reads as an output)."""
    for video in folder.glob("[!.]*.mp4"):
        assert read_mp4_info(video)["frames"] == FRAMES, f"{video} is incomplete"
    for sidecar in folder.glob("[!.]*.json"):
        assert sidecar.with_suffix(".mp4").is_file(), f"{sidecar} without its video"
    visible = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    assert visible <= {f"{s}.{ext}" for s in SAMPLE_IDS for ext in ("mp4", "latents.safetensors", "json")}, visible
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def assert_same_videos(folder: Path, reference: Path, sample_ids) -> None:
    for sample_id in sample_ids:
        produced, expected = folder / f"{sample_id}.mp4", reference / f"{sample_id}.mp4"
        assert produced.read_bytes() == expected.read_bytes(), f"{sample_id}: differs from the 1-process video"


def wait_for_first_output(folder: Path, slurm, job_id: str, timeout: float = 150) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = finished(folder)
        if done:
            return done
        state = slurm.state(job_id)
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"), f"job {job_id} is {state}"
        time.sleep(0.05)
    raise AssertionError(f"no sample finished within {timeout} s")


def log_of(work: Path, job_id: str) -> str:
    (log,) = (work / "logs").glob(f"*-{job_id}.out")
    return log.read_text(errors="replace")


# --------------------------------------------------------------------------------------------
# the real-Slurm tests


@pytest.mark.timeout(300)
def test_srun_two_tasks_without_torchrun_make_the_same_videos_as_one_process(slurm, work):
    job = slurm.sbatch("--ntasks-per-node=2", "--cpus-per-task=1", *CPU_JOB, "--output=logs/%x-%j.out",
                       str(REPO / "launch/slurm/generate_1node.sbatch"), cwd=work,
                       env=job_env(work, BINDWEAVE_LAUNCHER="srun", BINDWEAVE_OUTPUT="out-srun2"))
    state = slurm.wait_finished(job, timeout=240)
    log = log_of(work, job)
    assert state == "COMPLETED" and slurm.job(job)["ExitCode"] == "0:0", log[-4000:]
    assert "launcher srun" in log and "torch.distributed.run" not in log
    assert "(= 2 ranks)" in log, log[-4000:]  # the two tasks formed one process group
    assert finished(work / "out-srun2") == set(SAMPLE_IDS)
    assert assert_no_partial_output(work / "out-srun2") == []
    assert_same_videos(work / "out-srun2", work / "reference", SAMPLE_IDS)


@pytest.mark.timeout(300)
def test_scancel_mid_run_leaves_no_partial_output(slurm, work):
    output = work / "out-scancel"
    job = slurm.sbatch("--ntasks-per-node=2", "--cpus-per-task=1", *CPU_JOB, "--output=logs/%x-%j.out",
                       str(REPO / "launch/slurm/generate_1node.sbatch"), cwd=work,
                       env=job_env(work, BINDWEAVE_LAUNCHER="srun", BINDWEAVE_OUTPUT=output.name))
    wait_for_first_output(output, slurm, job)
    slurm.command("scancel", job)
    assert slurm.wait_finished(job, timeout=60) == "CANCELLED"
    time.sleep(1)  # let the killed processes' files settle
    done = finished(output)
    assert 0 < len(done) < len(SAMPLE_IDS), f"cancelled too late to test anything: {done}"
    temp_files = assert_no_partial_output(output)
    assert all(name.startswith(".") for name in temp_files), temp_files
    assert_same_videos(output, work / "reference", done)


@pytest.mark.timeout(300)
def test_a_bad_setting_ends_the_job_with_its_error_last_and_exit_code_2(slurm, work):
    """Through torchrun (which exits 1 whatever its ranks' codes and prints its own summary after
    them), the job still ends with rank 0's one error line and exit code 2."""
    job = slurm.sbatch("--cpus-per-task=2", *CPU_JOB, "--output=logs/%x-%j.out",
                       str(REPO / "launch/slurm/generate_1node.sbatch"), "model.attention_kernal=fa4", cwd=work,
                       env=job_env(work, BINDWEAVE_PROCS_PER_NODE="2", BINDWEAVE_OUTPUT="out-bad-setting"))
    state = slurm.wait_finished(job, timeout=240)
    log = log_of(work, job)
    assert state == "FAILED" and slurm.job(job)["ExitCode"] == "2:0", log[-3000:]
    assert log.strip().splitlines()[-1] == ("error: unknown setting model.attention_kernal (command-line override "
                                            "model.attention_kernal=fa4): did you mean model.attention_kernel?")
    assert not list(work.glob(".bindweave-status-*")) and not (work / "out-bad-setting").exists()


@pytest.mark.timeout(300)
def test_requeue_of_a_running_job_finishes_only_the_missing_samples(slurm, work):
    """The 1-node script's default path (srun -> torchrun, c10d rendezvous; 2 gloo processes here)."""
    output = work / "out-requeue"
    job = slurm.sbatch("--cpus-per-task=2", *CPU_JOB, "--output=logs/%x-%j.out",
                       str(REPO / "launch/slurm/generate_1node.sbatch"), cwd=work,
                       env=job_env(work, BINDWEAVE_PROCS_PER_NODE="2", BINDWEAVE_OUTPUT=output.name))
    wait_for_first_output(output, slurm, job)
    slurm.command("scontrol", "requeue", job)
    # Requeued: the job's processes are killed (COMPLETING until they are gone), then it waits in
    # PENDING for its BeginTime (about 2 minutes, skipped below).
    slurm.wait_for(job, {"PENDING"}, timeout=60)
    before = {s: (output / f"{s}.json").stat().st_mtime_ns for s in finished(output)}
    mp4_before = {s: (output / f"{s}.mp4").stat().st_mtime_ns for s in before}
    assert 0 < len(before) < len(SAMPLE_IDS), f"requeued too late to test anything: {sorted(before)}"
    assert_no_partial_output(output)

    slurm.command("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = slurm.wait_finished(job, timeout=240)
    log = log_of(work, job)
    assert state == "COMPLETED", log[-4000:]
    assert slurm.job(job)["Restarts"] == "1" and "restart 1" in log, log[-4000:]
    assert finished(output) == set(SAMPLE_IDS)
    for sample_id, mtime in before.items():  # finished before the requeue: skipped, not redone
        assert (output / f"{sample_id}.json").stat().st_mtime_ns == mtime, f"{sample_id} was redone"
        assert (output / f"{sample_id}.mp4").stat().st_mtime_ns == mp4_before[sample_id]
        assert f"{sample_id}: already done" in log
    second_run = log[log.index("restart 1"):]
    for sample_id in set(SAMPLE_IDS) - set(before):  # the missing ones: made by the requeued run
        assert f"{sample_id}: " in second_run and f"{sample_id}: already done" not in second_run
    assert all(name.startswith(".") for name in assert_no_partial_output(output))
    assert_same_videos(output, work / "reference", SAMPLE_IDS)


@pytest.mark.timeout(200)
def test_stage2_script_extracts_on_one_task(slurm, work):
    """extract_1gpu.sbatch (here without a GPU) on the built-in demo cases with the tiny Qwen2.5-VL."""
    job = slurm.sbatch("--cpus-per-task=1", *CPU_JOB, "--output=logs/%x-%j.out",
                       str(REPO / "launch/slurm/extract_1gpu.sbatch"), "progress=false", cwd=work,
                       env={"BINDWEAVE_ROOT": str(REPO), "BINDWEAVE_PYTHON": sys.executable,
                            "BINDWEAVE_OUTPUT": "features"})
    state = slurm.wait_finished(job, timeout=150)
    assert state == "COMPLETED", log_of(work, job)[-4000:]
    meta = json.loads((work / "features" / "meta_with_features.json").read_text())
    assert len(meta) == 3
    for entry in meta.values():
        assert (work / "features" / entry["hidden_states_path"]).is_file()


@pytest.fixture(scope="module")
def submitit_sweep(slurm, work):
    """`launch/generate.py -m hydra/launcher=slurm sampler.seed=1,2` at the tiny CPU size."""
    one = {"demo_face_1": json.loads((work / ".cache/demo-cases/meta9.json").read_text())["demo_face_1_v0"]}
    del one["demo_face_1"]["seed"]
    (work / ".cache/demo-cases/one.json").write_text(json.dumps(one))
    sweep = work / "sweep"
    command = [sys.executable, str(REPO / "launch/generate.py"), "-m", "hydra/launcher=slurm", "sampler.seed=1,2",
               *TINY, *meta_args(work, "one.json"), f"hydra.sweep.dir={sweep}",
               "hydra.launcher.gpus_per_node=0", "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=1",
               "hydra.launcher.timeout_min=10"]
    env = {**plain_env(), **{k: v for k, v in slurm.env.items() if k in ("SLURM_CONF", "PATH")}}
    started = time.monotonic()
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=280)
    return sweep, result, time.monotonic() - started


@pytest.mark.timeout(300)
def test_submitit_launcher_sweep_runs_each_job_on_slurm(submitit_sweep):
    sweep, result, _ = submitit_sweep
    job_folders = sorted(p for p in (sweep / ".submitit").glob("*_*") if p.is_dir())
    assert len(job_folders) == 2, result.stderr[-3000:]  # one Slurm array task per sweep job
    for number, seed in ((0, 1), (1, 2)):
        sidecar = sweep / str(number) / "demo_face_1.json"
        assert sidecar.is_file(), result.stderr[-3000:]
        assert json.loads(sidecar.read_text())["seed"] == seed
        assert read_mp4_info(sweep / str(number) / "demo_face_1.mp4")["frames"] == FRAMES
        assert len(list((sweep / str(number) / ".hydra" / "runs").glob("*/config.yaml"))) == 1


@pytest.mark.timeout(300)
def test_submitit_launcher_sweep_reports_success(submitit_sweep):
    """The submitting process collects both jobs' results (submitit's result pickles) and exits 0."""
    _, result, _ = submitit_sweep
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.timeout(300)
def test_submitit_launcher_sweep_prints_the_summary_table(submitit_sweep):
    _, result, _ = submitit_sweep
    text = result.stdout + result.stderr
    assert "sweep summary" in text and text.count("1 done, 0 skipped, 0 failed") == 2, text[-3000:]


# --------------------------------------------------------------------------------------------
# the scripts' documented submissions, as written (README folder names, the real presets, the
# tiny models under the presets' repo ids in an offline HF cache: tests/test_documented_commands.py)

PLACEHOLDER = " [more Hydra overrides]"
# The only sbatch options added to a documented submission: no GPUs, a short limit, one CPU per
# task (a 2-core node runs the two stage-3 jobs at once), and the multi-node script on the one node.
CPU_SBATCH = ["--gpus-per-node=0", "--time=10", "--cpus-per-task=1"]
CPU_SBATCH_SCRIPT = {"generate_multinode.sbatch": ["--nodes=1"]}


def documented_submission(script: Path) -> tuple[dict, list[str], str]:
    """The submission in `script`'s header: the indented comment lines after "Submit from the
    repository root:" up to the next empty comment line, continuation lines joined, ending in the
    `[more Hydra overrides]` placeholder. Returns (the NAME=value assignments before sbatch, the
    sbatch options, the script path as written)."""
    lines = script.read_text().splitlines()
    marker = [i for i, line in enumerate(lines) if "Submit from the repository root:" in line]
    assert len(marker) == 1, f"{script.name}: no 'Submit from the repository root:' in the header"
    example = []
    for line in lines[marker[0] + 1:]:
        assert line.startswith("#"), f"{script.name}: the header ends before the submission example"
        if not line[1:].strip():
            if example:
                break
            continue
        assert line.startswith("#   "), f"{script.name}: expected the indented example, got {line!r}"
        example.append(line[1:])
    text = re.sub(r"\\\n\s*", " ", "\n".join(example)).strip()
    assert "\n" not in text and text.endswith(PLACEHOLDER), f"{script.name}: not one command: {text!r}"
    words = shlex.split(text[:-len(PLACEHOLDER)])
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[0] == "sbatch" and words[-1] == f"launch/slurm/{script.name}", words
    assert all(word.startswith("-") for word in words[1:-1]), words
    return env, words[1:-1], words[-1]


def with_cpu_options(documented: list[str], added: list[str]) -> list[str]:
    """`added` after the documented options; a documented option of the same name is replaced."""
    names = {option.split("=", 1)[0] for option in added}
    return [option for option in documented if option.split("=", 1)[0] not in names] + added


def submit_documented(slurm, name: str, folder: Path, hf_home: Path, overrides: list[str]) -> tuple[str, dict]:
    """Submit launch/slurm/NAME as its header says, from `folder`, with the CPU options and
    `overrides` in place of `[more Hydra overrides]`. Returns (job id, the documented variables)."""
    env, options, script = documented_submission(REPO / "launch" / "slurm" / name)
    options = with_cpu_options(options, CPU_SBATCH + CPU_SBATCH_SCRIPT.get(name, []))
    job = slurm.sbatch(*options, script, *overrides, cwd=folder,
                       env={**env, "BINDWEAVE_ROOT": str(REPO), "BINDWEAVE_PYTHON": sys.executable,
                            **hf_env(hf_home)})
    return job, env


def documented_log(folder: Path, job_id: str) -> str:
    logs = list(folder.glob(f"*-{job_id}.out"))  # the scripts' own --output=%x-%j.out
    return logs[0].read_text(errors="replace")[-4000:] if logs else f"(no log of job {job_id} in {folder})"


STAGE3_SCRIPTS = ("generate_1node.sbatch", "generate_multinode.sbatch")


@pytest.fixture(scope="module")
def documented_jobs(slurm, tiny_hf_home, tmp_path_factory):
    """Stage 2 (extract_1gpu.sbatch) submitted as documented and finished; then both stage-3
    scripts submitted as documented (they read stage 2's meta), running side by side."""
    folder = documented_folder(tmp_path_factory.mktemp("slurm-documented"))
    home = tiny_hf_home[0]
    extract, extract_env = submit_documented(slurm, "extract_1gpu.sbatch", folder, home, CPU_EXTRACT)
    extract_state = slurm.wait_finished(extract, timeout=150)
    stage3 = {}
    if extract_state == "COMPLETED":
        stage3 = {name: submit_documented(slurm, name, folder, home, CPU_GENERATE) for name in STAGE3_SCRIPTS}
    return folder, (extract, extract_env, extract_state), stage3


@needs_opens2v
@pytest.mark.timeout(300)
def test_documented_stage2_submission_extracts_with_the_real_preset(slurm, documented_jobs, tiny_hf_home):
    folder, (job, env, state), _ = documented_jobs
    _, snapshots, folders = tiny_hf_home
    assert state == "COMPLETED" and slurm.job(job)["ExitCode"] == "0:0", documented_log(folder, job)
    qwen = QWEN_PRESET["path"]
    output = folder / env.get("BINDWEAVE_OUTPUT", f"outputs/slurm-{job}")
    check_features(output, case_ids(), qwen, folders[qwen], snapshots[qwen].name)


@needs_opens2v
@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", STAGE3_SCRIPTS)
def test_documented_stage3_submission_generates_with_the_real_preset(slurm, documented_jobs, tiny_hf_home, script):
    folder, (extract, _, extract_state), stage3 = documented_jobs
    assert script in stage3, f"stage 2 ({extract}) ended {extract_state}:\n{documented_log(folder, extract)}"
    job, env = stage3[script]
    _, snapshots, folders = tiny_hf_home
    state = slurm.wait_finished(job, timeout=200)
    assert state == "COMPLETED" and slurm.job(job)["ExitCode"] == "0:0", documented_log(folder, job)
    output = folder / env.get("BINDWEAVE_OUTPUT", f"outputs/slurm-{job}")
    check_videos(output, case_ids(), {name: (str(snapshots[MODEL_PRESET[name]]), snapshots[MODEL_PRESET[name]].name,
                                             folders[MODEL_PRESET[name]]) for name in ("dit", "wan")})
    check_real_preset(output, [*env.get("BINDWEAVE_ARGS", "").split(), *CPU_GENERATE])


def test_the_slurm_readme_rows_are_the_scripts_documented_submissions():
    """launch/slurm/README.md repeats the scripts' submissions: its complete rows (no `...`) must be
    exactly what the headers say (and the tests above run)."""
    readme = (REPO / "launch" / "slurm" / "README.md").read_text()
    rows = re.findall(r"`((?:[A-Z_]+=\S+ )*(?:[A-Z_]+=\"[^\"]*\" )*sbatch [^`]*launch/slurm/(\w+\.sbatch))`", readme)
    complete = [(command, name) for command, name in rows if "..." not in command and "--gpus-per-node=0" not in command]
    assert {name for _, name in complete} == {"generate_1node.sbatch", "extract_1gpu.sbatch", "serve_1node.sbatch"}, \
        rows
    for command, name in complete:
        env, options, script = documented_submission(REPO / "launch" / "slurm" / name)
        words = shlex.split(command)
        assert words == [*(f"{key}={value}" for key, value in env.items()), "sbatch", *options, script], command


# The request defaults of a CPU-sized server (each request names its own size and steps too).
CPU_SERVE = ["video.height=48", "video.width=64", "video.num_frames=5", "sampler.num_steps=2"]


@pytest.mark.timeout(300)
def test_documented_serving_submission_serves_the_api_and_drains_on_scancel(slurm, tiny_hf_home, tmp_path):
    """serve_1node.sbatch submitted as its header says (the real presets, resolved offline from the
    tiny HF cache), on a free port: the openai client makes a video through it; scancel drains it."""
    import httpx2
    from openai import OpenAI

    from serve_process import free_port, reference_images

    port = free_port()
    folder = documented_folder(tmp_path / "serve")  # the README's layout: launch/ beside the user's files
    job, env = submit_documented(slurm, "serve_1node.sbatch", folder, tiny_hf_home[0],
                                 [f"serve.port={port}", *CPU_SERVE])
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx2.TransportError:
            pass
        assert slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), documented_log(folder, job)
        time.sleep(0.5)
    else:
        pytest.fail(f"the replica did not become ready:\n{documented_log(folder, job)}")
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=env["BINDWEAVE_API_KEYS"], max_retries=0)
    (image, *_) = reference_images(tmp_path)
    with image.open("rb") as reference:
        video = client.videos.create(model="bindweave", prompt="a red ball rolls", input_reference=reference,
                                     size="64x48", extra_body={"num_frames": 5, "steps": 2})
    video = client.videos.poll(video.id, poll_interval_ms=100)
    assert video.status == "completed", documented_log(folder, job)
    assert (folder / "outputs" / "serve" / "jobs" / video.id / "video.mp4").is_file()  # serve.state_dir
    slurm.command("scancel", job)
    slurm.wait_finished(job, timeout=120)
    assert "Application shutdown complete." in documented_log(folder, job)
