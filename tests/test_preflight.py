"""The stage-3 preflight: every problem of a job found at once, before any model is loaded,
with nothing written."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bindweave.io import inputs
from bindweave.errors import BindWeaveInputError
from bindweave.settings.model import VideoSettings
from bindweave.stages.preflight import JobProblem, check_job
from parallel_launch import plain_env  # tests/ is on sys.path

SMALL_VIDEO = VideoSettings(height=32, width=32, num_frames=5)
STATE_TOKENS = 8


@pytest.fixture(scope="module")
def hidden_dim(tiny_models) -> int:
    """The tiny DiT's Qwen hidden size: what its hidden-states files must have."""
    return json.loads((tiny_models.bindweave / "config.json").read_text())["mllm_dim"]


class Job:
    """A meta JSON with its images (under images/) and hidden states (beside the meta file)."""

    def __init__(self, root: Path, hidden_dim: int):
        self.root = root
        self.hidden_dim = hidden_dim
        self.images = root / "images"
        self.images.mkdir()
        self.meta: dict = {}
        self.meta_path = root / "meta.json"

    def image(self, name: str) -> str:
        Image.new("RGB", (32, 32), (200, 40, 10)).save(self.images / name)
        return name

    def states(self, name: str, dim: int | None = None) -> str:
        dim = dim or self.hidden_dim
        inputs.save_hidden_states(self.root / name, torch.randn(1, STATE_TOKENS, dim),
                                torch.randn(1, STATE_TOKENS, dim), {})
        return name

    def tensor_file(self, name: str, tensor: torch.Tensor) -> str:
        """An official-format .pt file holding one bare tensor."""
        torch.save(tensor, self.root / name)
        return name

    def good_sample(self, sample_id: str, **changes) -> dict:
        entry = {"img_paths": [self.image(f"{sample_id}.png")], "prompt": f"a video of {sample_id}",
                 "hidden_states_path": self.states(f"{sample_id}.safetensors"), **changes}
        self.meta[sample_id] = {key: value for key, value in entry.items() if value is not None}
        return self.meta[sample_id]

    def write(self) -> Path:
        self.meta_path.write_text(json.dumps(self.meta))
        return self.meta_path

    def check(self, **kwargs):
        kwargs.setdefault("output_dir", self.root / "out")
        kwargs.setdefault("video", SMALL_VIDEO)
        kwargs.setdefault("check_video_writer", False)
        return check_job(self.write(), self.images, hidden_dim=self.hidden_dim, **kwargs)


@pytest.fixture
def job(tmp_path, hidden_dim) -> Job:
    return Job(tmp_path, hidden_dim)


def _files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def fifty_samples_ten_problems(job: Job, tmp_path: Path) -> list[str]:
    """50 samples, 9 of them bad with 10 problems of 8 kinds; returns the sample ids."""
    ids = [f"s{index:02d}" for index in range(50)]
    for sample_id in ids:
        job.good_sample(sample_id)
    # Good samples in the official format: a .pt pair.
    for sample_id in ids[40:43]:
        positive = job.tensor_file(f"{sample_id}.pt", torch.randn(STATE_TOKENS, job.hidden_dim))
        negative = job.tensor_file(f"{sample_id}_neg.pt", torch.randn(1, STATE_TOKENS, job.hidden_dim))
        job.good_sample(sample_id, hidden_states_path=positive, hidden_states_path_negative=negative)
    job.meta["s03"]["img_paths"].append("s03_missing.png")
    (job.images / "s07_empty.png").touch()
    job.meta["s07"]["img_paths"] = ["s07_empty.png"]
    (job.images / "s11_text.jpg").write_text("not an image at all\n")
    job.meta["s11"]["img_paths"] = ["s11_text.jpg"]
    job.meta["s15"]["hidden_states_path"] = "s15_missing.safetensors"
    nan_states = torch.randn(1, STATE_TOKENS, job.hidden_dim)
    nan_states[0, 3, 5] = float("nan")
    save_file({"positive": nan_states, "negative": torch.randn(1, STATE_TOKENS, job.hidden_dim)},
              tmp_path / "s19_nan.safetensors")
    job.meta["s19"]["hidden_states_path"] = "s19_nan.safetensors"
    job.meta["s23"]["hidden_states_path"] = job.states("s23_wrong_dim.safetensors", dim=job.hidden_dim + 8)
    del job.meta["s27"]["hidden_states_path"]
    job.meta["s31"]["img_paths"] = "s31.png"  # a string, not a list
    # Two bad files in one sample: a missing image and an infinite official negative.
    inf_negative = torch.randn(STATE_TOKENS, job.hidden_dim)
    inf_negative[2, 0] = float("inf")
    job.meta["s39"]["img_paths"].append("s39_missing.png")
    job.meta["s39"]["hidden_states_path"] = job.tensor_file("s39.pt", torch.randn(STATE_TOKENS, job.hidden_dim))
    job.meta["s39"]["hidden_states_path_negative"] = job.tensor_file("s39_neg.pt", inf_negative)
    job.write()
    return ids


def test_fifty_samples_ten_problems_all_reported_nothing_written(job, tmp_path):
    ids = fifty_samples_ten_problems(job, tmp_path)
    output_dir = tmp_path / "out" / "videos"
    written_by_test = _files_under(tmp_path)

    result = job.check(output_dir=output_dir, check_video_writer=True)

    assert [(problem.sample_id, problem.field) for problem in result.problems] == [
        ("s03", "img_paths[1]"),
        ("s07", "img_paths[0]"),
        ("s11", "img_paths[0]"),
        ("s15", "hidden_states_path"),
        ("s19", "hidden_states_path"),
        ("s23", "hidden_states_path"),
        ("s27", "hidden_states_path"),
        ("s31", "meta"),
        ("s39", "img_paths[1]"),
        ("s39", "hidden_states_path_negative"),
    ]
    by_id = {problem.sample_id: problem for problem in result.problems}
    assert by_id["s03"].path == str(job.images / "s03_missing.png") and "does not exist" in by_id["s03"].message
    assert "empty (0 bytes)" in by_id["s07"].message
    assert "not an image" in by_id["s11"].message
    assert by_id["s15"].path == str(tmp_path / "s15_missing.safetensors")
    assert by_id["s19"].path == str(tmp_path / "s19_nan.safetensors")
    assert "NaN or infinite" in by_id["s19"].message and "re-run stage 2" in by_id["s19"].message
    assert f"expected [L, {job.hidden_dim}]" in by_id["s23"].message
    assert by_id["s27"].path is None and '"hidden_states_path"' in by_id["s27"].message
    assert by_id["s31"].path == str(job.meta_path) and '"img_paths"' in by_id["s31"].message
    assert result.problems[-1].path == str(tmp_path / "s39_neg.pt")
    assert "NaN or infinite" in result.problems[-1].message
    assert result.bad_sample_ids == {"s03", "s07", "s11", "s15", "s19", "s23", "s27", "s31", "s39"}
    assert result.job_problems == []
    assert [sample.sample_id for sample in result.samples] == sorted(set(ids) - result.bad_sample_ids)
    assert len(result.samples) == 41

    report = result.report()
    assert report.startswith(f"10 problems in {job.meta_path} (9 of 50 samples; nothing was loaded or written):")
    assert all(f"  - {problem.sample_id}: {problem.field}" in report for problem in result.problems)
    assert "more" not in report
    error = result.error()
    assert isinstance(error, BindWeaveInputError) and str(error) == report

    assert not output_dir.exists() and not output_dir.parent.exists()
    assert _files_under(tmp_path) == written_by_test


def test_the_entry_point_reports_all_ten_before_loading_and_writes_nothing(job, tmp_path, tiny_models):
    """The same job through `launch/generate.py`: exit 2, all 10 problems in the one error, no model
    loaded, no output folder."""
    fifty_samples_ten_problems(job, tmp_path)
    output_dir = tmp_path / "videos"
    written_by_test = _files_under(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(repo / "launch" / "generate.py"),
                             f"model.tiny_root={tiny_models.bindweave.parent}", f"data.meta_path={job.meta_path}",
                             f"data.image_root={job.images}", f"output_dir={output_dir}"],
                            cwd=tmp_path, env=plain_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr[result.stderr.index("error: "):]
    assert error.startswith(f"error: 10 problems in {job.meta_path} (9 of 50 samples; nothing was loaded or written)")
    assert error.count("\n  - s") == 10
    assert "loading stage-3 models" not in result.stderr
    assert _files_under(tmp_path) == written_by_test


def test_report_lists_the_first_twenty_and_counts_the_rest(job):
    for index in range(25):
        job.good_sample(f"s{index:02d}", img_paths=[f"missing_{index}.png"])

    result = job.check()

    lines = result.report(limit=20).splitlines()
    assert lines[0].startswith("25 problems in ") and "(25 of 25 samples;" in lines[0]
    assert len(lines) == 1 + 20 + 1
    assert lines[1].startswith("  - s00: img_paths[0] (") and lines[20].startswith("  - s19: ")
    assert lines[-1] == "  ... and 5 more"


def test_finished_samples_are_not_checked(job):
    job.good_sample("done", img_paths=["gone.png"], hidden_states_path="gone.safetensors")
    job.good_sample("todo")

    result = job.check(finished={"done"})

    assert result.problems == []
    assert [sample.sample_id for sample in result.samples] == ["done", "todo"]
    assert "done" in {problem.sample_id for problem in job.check().problems}


def test_a_meta_file_that_cannot_be_read_is_raised(job):
    job.meta_path.write_text("{not json")
    with pytest.raises(BindWeaveInputError, match="not valid JSON"):
        check_job(job.meta_path, job.images, hidden_dim=job.hidden_dim, output_dir=job.root / "out",
                  video=SMALL_VIDEO, check_video_writer=False)


def test_output_dir_that_is_a_file(job):
    job.good_sample("a")
    output_file = job.root / "out.mp4"
    output_file.write_bytes(b"x")

    for output_dir in (output_file, output_file / "videos"):
        (problem,) = job.check(output_dir=output_dir).problems
        assert (problem.sample_id, problem.field, problem.path) == (None, "output_dir", str(output_dir))
        assert f"{output_file} is a file" in problem.message and "output_dir=" in problem.message


def test_output_dir_under_an_unwritable_folder(job, monkeypatch):
    job.good_sample("a")
    locked = job.root / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the check see a read-only folder
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    else:
        locked.chmod(0o500)

    try:
        result = job.check(output_dir=locked / "videos")
    finally:
        locked.chmod(0o700)

    (problem,) = result.job_problems
    assert problem.field == "output_dir" and f"{locked} is not writable" in problem.message
    assert [sample.sample_id for sample in result.samples] == ["a"]
    assert not (locked / "videos").exists()


def test_not_enough_disk_space(job, monkeypatch):
    for index in range(50):
        job.good_sample(f"s{index:02d}")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))

    result = job.check(video=VideoSettings(height=720, width=1280, num_frames=81), finished={"s00", "s01"})

    (problem,) = result.job_problems
    assert problem.field == "output_dir"
    assert "48 videos of 1280x720x81 frames need up to 1.7 GiB, but only 1.0 MiB is free" in problem.message
    assert "output_dir=" in problem.message
    assert job.check(video=SMALL_VIDEO, finished={f"s{index:02d}" for index in range(50)}).problems == []


def test_healthy_video_writer_gives_no_problem_and_leaves_no_file(job, tmp_path, monkeypatch):
    job.good_sample("a")
    # A temp folder of this test's own: other test processes run the same check in the system one.
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    assert job.check(check_video_writer=True).problems == []
    assert list(temp.iterdir()) == []


@pytest.mark.parametrize("breakage", ["missing binary", "failing binary", "no plugin"])
def test_broken_video_writer_is_one_job_problem(job, monkeypatch, breakage):
    job.good_sample("a")
    if breakage == "missing binary":
        monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(job.root / "no-ffmpeg"))
    elif breakage == "failing binary":
        script = job.root / "ffmpeg"
        script.write_text("#!/bin/sh\nexit 1\n")
        script.chmod(0o755)
        monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(script))
    else:
        monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import raises ImportError

    result = job.check(check_video_writer=True)

    assert result.problems == result.job_problems
    (problem,) = result.problems
    assert problem.field == "video writer"
    assert "pip install imageio-ffmpeg" in problem.message and "IMAGEIO_FFMPEG_EXE" in problem.message
    assert [sample.sample_id for sample in result.samples] == ["a"]
    assert result.report() == f"{problem.line()} ({job.meta_path}: nothing was loaded or written)"


def test_problem_lines_name_sample_field_and_path():
    assert (JobProblem("s1", "img_paths[0]", "/x.png", "missing").line()
            == "s1: img_paths[0] (/x.png): missing")
    assert JobProblem(None, "video writer", None, "broken").line() == "video writer: broken"
