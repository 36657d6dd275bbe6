"""Checking a whole stage-3 job before any model is loaded, and reporting every problem at once.

Loading the 14B models takes minutes; a bad image in sample 40 should not cost those minutes
and then stop the job, and fixing one problem per run is slow. `check_job` runs every input check
that stage 3 would run (the same readers from `bindweave.io.inputs`), plus the output folder and the
video writer, and gathers what fails into one `JobCheck`. It loads no model and writes nothing,
except one tiny clip in a temporary folder to prove that the video writer works.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bindweave.io import inputs, outputs
from bindweave.io.inputs import Sample
from bindweave.errors import BindWeaveInputError

if TYPE_CHECKING:  # pipeline imports the model stack; the check must stay light
    from bindweave.settings.model import VideoSettings

MIB = 1024**2
GIB = 1024**3
# An upper bound of an H.264 MP4's size at CRF ~20: half a byte per pixel per frame (real clips
# take far less), plus 1 MiB for headers and the first frame. Generous on purpose: running out
# of space after hours of generation costs far more than asking for too much here.
MP4_BYTES_PER_PIXEL_FRAME = 0.5
MP4_FIXED_BYTES = MIB
VIDEO_WRITER_FIX = ("pip install imageio-ffmpeg, or set IMAGEIO_FFMPEG_EXE to an ffmpeg binary "
                    "that has libx264")


@dataclass(frozen=True)
class JobProblem:
    """One thing wrong with a job: which sample (None for the job itself), field and file, and
    what is wrong with how to fix it."""

    sample_id: str | None
    field: str
    path: str | None
    message: str

    def reason(self) -> str:
        """``field (path): message``: what is wrong, without the sample id."""
        where = self.field if self.path is None else f"{self.field} ({self.path})"
        return f"{where}: {self.message}"

    def line(self) -> str:
        """One report line: ``sample_id: field (path): message``."""
        return self.reason() if self.sample_id is None else f"{self.sample_id}: {self.reason()}"


@dataclass
class JobCheck:
    """The outcome of `check_job`: the samples that passed, and every problem found."""

    samples: list[Sample]
    problems: list[JobProblem]
    meta_path: Path
    sample_count: int  # every sample in the meta file, good, bad or finished

    @property
    def bad_sample_ids(self) -> set[str]:
        return {problem.sample_id for problem in self.problems if problem.sample_id is not None}

    @property
    def job_problems(self) -> list[JobProblem]:
        """Problems of the job as a whole (output folder, video writer), not of one sample."""
        return [problem for problem in self.problems if problem.sample_id is None]

    def report(self, limit: int = 20, skipping: bool = False) -> str:
        """All problems in one text, the first `limit` listed: what a user reads to fix them all.
        One problem is one line. ``skipping``: the bad samples are skipped (on_error=skip), the
        others run."""
        count = len(self.problems)
        outcome = "skipped (on_error=skip)" if skipping else "nothing was loaded or written"
        if count == 1:
            return f"{self.problems[0].line()} ({self.meta_path}: {outcome})"
        lines = [f"{count} problems in {self.meta_path} ({len(self.bad_sample_ids)} of {self.sample_count} "
                 f"samples; {outcome}):"]
        lines += [f"  - {problem.line()}" for problem in self.problems[:limit]]
        if count > limit:
            lines.append(f"  ... and {count - limit} more")
        return "\n".join(lines)

    def error(self) -> BindWeaveInputError:
        """The report as the one error type entry points print (exit code 2)."""
        return BindWeaveInputError(self.report())


def check_job(meta_path: str | os.PathLike, image_root: str | os.PathLike | None, *, hidden_dim: int,
              output_dir: Path, video: VideoSettings, finished: set[str] = frozenset(),
              check_video_writer: bool = True) -> JobCheck:
    """Check every input and output of a stage-3 job; return the good samples and all problems.

    A meta file that cannot be read at all raises BindWeaveInputError, as `read_meta` does. Each
    malformed sample entry is a problem (finished ones too: stage 3 parses every entry). The
    images and hidden states of `finished` samples are not checked: resume skips them. The
    output folder is checked without being created.
    """
    meta_path = Path(meta_path)
    malformed: dict[str, str] = {}
    parsed = inputs.read_meta(meta_path, image_root, invalid=malformed)
    problems = [JobProblem(sample_id, "meta", str(meta_path), message)
                for sample_id, message in malformed.items()]
    for sample in parsed:
        if sample.sample_id not in finished:
            problems += _image_problems(sample) + _hidden_state_problems(sample, hidden_dim)
    problems.sort(key=lambda problem: problem.sample_id)  # stable: a sample's own order is kept
    samples_to_make = len((set(malformed) | {sample.sample_id for sample in parsed}) - set(finished))
    problems += _output_dir_problems(Path(output_dir), video, samples_to_make)
    if check_video_writer:
        problems += _video_writer_problems()
    bad_ids = {problem.sample_id for problem in problems}
    return JobCheck(samples=[sample for sample in parsed if sample.sample_id not in bad_ids],
                    problems=problems, meta_path=meta_path,
                    sample_count=len(parsed) + len(malformed))


def _problem_of(check: Callable[[], object], sample_id: str, field: str,
                path: Path | None) -> list[JobProblem]:
    """Run one of `bindweave.io.inputs`'s checks; its BindWeaveInputError becomes one problem."""
    try:
        check()
    except BindWeaveInputError as error:
        return [JobProblem(sample_id, field, None if path is None else str(path), str(error))]
    return []


def _image_problems(sample: Sample) -> list[JobProblem]:
    """One problem per reference image that stage 3 could not open (missing, empty, undecodable,
    too large), by the same loader stage 3 uses."""
    return [problem
            for index, path in enumerate(sample.image_paths)
            for problem in _problem_of(functools.partial(inputs.load_reference_image, path),
                                       sample.sample_id, f"img_paths[{index}]", path)]


def _hidden_state_problems(sample: Sample, hidden_dim: int) -> list[JobProblem]:
    """One problem per bad hidden-states file (missing, unreadable, wrong shape or dtype, NaN/Inf),
    or per missing path field.

    Stage 3's loader, `load_sample_hidden_states`, stops at the first bad file, so a sample naming
    two files (the official .pt pair) has each loaded on its own: two bad files, two problems. With
    one path or none, that loader itself checks the file (a project safetensors file holds both
    sides) or names the missing field before opening anything.
    """
    positive_path = sample.hidden_states_path
    negative_path = sample.hidden_states_path_negative
    if positive_path is not None and negative_path is not None:
        return [*_problem_of(functools.partial(inputs.load_hidden_states, positive_path, hidden_dim=hidden_dim),
                             sample.sample_id, "hidden_states_path", positive_path),
                *_problem_of(functools.partial(inputs.load_hidden_states, negative_path, negative=True,
                                               hidden_dim=hidden_dim),
                             sample.sample_id, "hidden_states_path_negative", negative_path)]
    if positive_path is None:
        field, path = "hidden_states_path", None
    elif positive_path.suffix == ".safetensors":
        field, path = "hidden_states_path", positive_path
    else:  # an official .pt positive needs its separate negative file
        field, path = "hidden_states_path_negative", None
    return _problem_of(functools.partial(inputs.load_sample_hidden_states, sample, hidden_dim=hidden_dim),
                       sample.sample_id, field, path)


def _output_dir_problems(output_dir: Path, video: VideoSettings, samples_to_make: int) -> list[JobProblem]:
    """The output folder can be made (or is) a writable folder with room for the videos to come.

    Judged from the nearest folder that exists, so that nothing is created by the check.
    """
    output_dir = output_dir.absolute()
    existing = _nearest_existing(output_dir)
    if not existing.is_dir():
        what = "is a file" if existing == output_dir else f"cannot be created: {existing} is a file"
        return [JobProblem(None, "output_dir", str(output_dir),
                           f"The output folder {output_dir} {what}. Remove or rename that file, or "
                           f"choose another folder (output_dir=...).")]
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == output_dir else f"cannot be created: {existing} is not writable"
        return [JobProblem(None, "output_dir", str(output_dir),
                           f"The output folder {output_dir} {what}. Fix the permissions or choose "
                           f"another folder (output_dir=...).")]
    return _disk_space_problems(output_dir, existing, video, samples_to_make)


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (the root always does)."""
    while not path.exists():
        path = path.parent
    return path


def _disk_space_problems(output_dir: Path, existing: Path, video: VideoSettings,
                         samples_to_make: int) -> list[JobProblem]:
    """Enough free space for every video still to make, at a generous size per video."""
    per_video = video.height * video.width * video.num_frames * MP4_BYTES_PER_PIXEL_FRAME + MP4_FIXED_BYTES
    needed = samples_to_make * per_video
    free = shutil.disk_usage(existing).free
    if needed <= free:
        return []
    return [JobProblem(None, "output_dir", str(output_dir),
                       f"Not enough disk space for {output_dir}: {samples_to_make} videos of "
                       f"{video.width}x{video.height}x{video.num_frames} frames need up to "
                       f"{_size(needed)}, but only {_size(free)} is free there. Free some space or "
                       f"choose another folder (output_dir=...).")]


def _size(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB else f"{num_bytes / MIB:.1f} MiB"


def _video_writer_problems() -> list[JobProblem]:
    """imageio's ffmpeg can encode and decode one tiny H.264 clip, the way outputs are written.

    The clip goes to a temporary folder, never to the output folder. Any exception counts as a
    broken writer: ImportError (no imageio-ffmpeg), RuntimeError (no binary found), OSError (a
    binary that is missing or fails), or anything else the plugin raises; its text is kept.
    """
    ffmpeg_exe = None
    try:
        import imageio_ffmpeg

        ffmpeg_exe = imageio_ffmpeg.get_ffmpeg_exe()
        with tempfile.TemporaryDirectory(prefix="bindweave-preflight-") as folder:
            clip = Path(folder) / "check.mp4"
            outputs.write_mp4(clip, np.zeros((2, 16, 16, 3), dtype=np.uint8))
            info = outputs.read_mp4_info(clip)
        if (info["frames"], info["width"], info["height"]) != (2, 16, 16):
            raise RuntimeError(f"a 2-frame 16x16 clip read back as {info}")
    except Exception as error:  # noqa: BLE001 - see the docstring
        return [JobProblem(None, "video writer", ffmpeg_exe,
                           f"The video writer (imageio + ffmpeg) does not work "
                           f"({type(error).__name__}: {error}): {VIDEO_WRITER_FIX}.")]
    return []
