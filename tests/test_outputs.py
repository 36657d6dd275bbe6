"""Writing outputs atomically (bindweave/io/outputs.py)."""

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from bindweave.io import outputs
from bindweave.errors import BindWeaveInputError
from bindweave.io.outputs import atomic_write, read_mp4_info, video_done, write_json, write_mp4


def frames(count=5, height=48, width=64):
    ramp = np.linspace(0, 255, count * height * width * 3) % 256
    return ramp.astype(np.uint8).reshape(count, height, width, 3)


def test_write_mp4_then_read_info(tmp_path):
    path = tmp_path / "videos" / "case.mp4"
    write_mp4(path, frames())
    assert read_mp4_info(path) == {"frames": 5, "fps": 16, "width": 64, "height": 48}
    assert os.listdir(path.parent) == ["case.mp4"]


def test_write_mp4_refuses_odd_size(tmp_path):
    with pytest.raises(BindWeaveInputError, match="65x48"):
        write_mp4(tmp_path / "odd.mp4", frames(width=65))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", [frames().astype(np.float32), frames()[0], frames()[..., :1]])
def test_write_mp4_refuses_wrong_layout(tmp_path, bad):
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "bad.mp4", bad)


def test_write_mp4_disk_full_leaves_nothing(tmp_path, monkeypatch):
    class DiskFullWriter:
        def __init__(self, path, **options):
            self.file = open(path, "wb")

        def close(self):
            self.file.close()

        def append_data(self, frame):
            self.file.write(frame.tobytes())
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.iio, "get_writer", DiskFullWriter)
    path = tmp_path / "case.mp4"
    with pytest.raises(BindWeaveInputError, match="Disk full") as info:
        write_mp4(path, frames())
    assert str(path) in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path, error):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_write(path) as temp_path:
            assert temp_path.parent == tmp_path and temp_path.suffix == ".json"
            temp_path.write_text("half")
            raise error
    assert os.listdir(tmp_path) == ["result.json"] and path.read_text() == "old"


def test_atomic_write_failure_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "new.mp4") as temp_path:
            temp_path.write_bytes(b"partial")
            raise RuntimeError("encoder crashed")
    assert os.listdir(tmp_path) == []


def test_atomic_write_unwritable_folder(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):  # root ignores permission bits: simulate instead
            monkeypatch.setattr(os, "access", lambda path, mode: False)
        with pytest.raises(BindWeaveInputError, match="output_dir=") as info:
            write_json(folder / "x.json", {})
        assert str(folder) in str(info.value)
    finally:
        folder.chmod(0o700)
    assert os.listdir(folder) == []


def test_write_json_and_video_done(tmp_path):
    video = tmp_path / "case.mp4"
    write_mp4(video, frames(count=1))
    assert not video_done(video)
    write_json(video.with_suffix(".json"), {"prompt": "un café", "seed": 1234})
    assert video_done(video)
    sidecar = json.loads(video.with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["prompt"] == "un café"


def test_write_json_unserialisable_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"bad": object()})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# complete files only: a full disk, an I/O error, a video ffmpeg did not finish; the umask


def noise_frames(count=8, size=256):
    """Frames that H.264 cannot squeeze: 8 of 256x256 make an MP4 of several hundred KiB."""
    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def too_big_json(path):
    write_json(path, {"filler": "x" * 400_000})


def too_big_mp4(path):
    write_mp4(path, noise_frames())


def too_big_hidden_states(path):
    from bindweave.io.inputs import save_hidden_states

    save_hidden_states(path, torch.randn(1, 300, 256), torch.randn(1, 20, 256), {"prompt": "p"})


WRITERS = {"case.mp4": too_big_mp4, "case.json": too_big_json, "case.safetensors": too_big_hidden_states}


def assert_disk_full_names(error: BindWeaveInputError, path):
    message = str(error)
    assert message.startswith(f"Disk full while writing {path}: nothing was written to {path.name} "
                              "and the files written before it are kept."), message
    assert "\n" not in message and "output_dir=" in message


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_file_bigger_than_a_real_small_disk_never_gets_its_name(small_disk, name):
    """Each writer, on a real full disk: one error naming that file, nothing under its name, no temp
    file, and the file finished before it kept. The MP4 is the reported case: ffmpeg fails on the
    full disk while imageio returns normally, which used to rename a truncated MP4 into place."""
    earlier = small_disk / "earlier.json"
    write_json(earlier, {"finished": True})
    path = small_disk / name
    with pytest.raises(BindWeaveInputError) as info:
        WRITERS[name](path)
    assert_disk_full_names(info.value, path)
    assert sorted(os.listdir(small_disk)) == ["earlier.json"]
    assert json.loads(earlier.read_text()) == {"finished": True}


def test_a_video_ffmpeg_could_not_finish_never_gets_its_name(tmp_path):
    """No root needed: a file-size limit makes ffmpeg's own writes fail (EFBIG) as a full disk does.
    imageio reports nothing; the MP4 check does, and the disk is not full, so the error says so."""
    import resource
    import signal

    path = tmp_path / "case.mp4"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # ffmpeg inherits it: EFBIG, not killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(BindWeaveInputError) as info:
            write_mp4(path, noise_frames())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    message = str(info.value)
    # ffmpeg writes the encoded frames at the end (x264's lookahead), so it fails after the last frame
    assert message.startswith(f"Cannot write {path}: the video writer (ffmpeg) "), message
    assert f"nothing was written to {path.name}" in message and "\n" not in message
    assert os.listdir(tmp_path) == []


class TruncatingWriter:
    """imageio's writer as it behaves when ffmpeg fails: frames accepted, close() returns normally,
    and the file holds only the first half of the real video."""

    def __init__(self, path, **options):
        self.path, self.options, self.frames = path, options, []

    def append_data(self, frame):
        self.frames.append(frame)

    def close(self):
        complete = self.path.with_name("complete.mp4")
        writer = REAL_GET_WRITER(complete, **self.options)
        for frame in self.frames:
            writer.append_data(frame)
        writer.close()
        data = complete.read_bytes()
        self.path.write_bytes(data[:len(data) // 2])
        complete.unlink()


REAL_GET_WRITER = outputs.iio.get_writer


def test_injected_silent_ffmpeg_failure_on_a_full_disk_is_disk_full(tmp_path, monkeypatch):
    """Without root: the writer leaves a truncated MP4 and raises nothing, the disk has no space left."""
    monkeypatch.setattr(outputs.iio, "get_writer", TruncatingWriter)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10**9, 10**9, 0))
    path = tmp_path / "case.mp4"
    with pytest.raises(BindWeaveInputError) as info:
        write_mp4(path, frames(count=20))
    assert_disk_full_names(info.value, path)
    assert os.listdir(tmp_path) == []


def test_overwrite_that_fails_keeps_the_old_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "case.mp4"
    write_mp4(path, frames(count=2))
    old = path.read_bytes()
    monkeypatch.setattr(outputs.iio, "get_writer", TruncatingWriter)
    with pytest.raises(BindWeaveInputError) as info:
        write_mp4(path, frames(count=20))
    assert f"{path.name} keeps its previous content" in str(info.value)
    assert os.listdir(tmp_path) == ["case.mp4"] and path.read_bytes() == old


@pytest.mark.parametrize("raised, expected", [
    (OSError(errno.ENOSPC, "No space left on device"), "Disk full while writing"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk full while writing"),
    (OSError(errno.EIO, "Input/output error"), "Cannot write {path} (Input/output error)"),
    # safetensors (Rust) raises its own error type and names the errno only in its text
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), "Disk full while writing"),
], ids=["ENOSPC", "EDQUOT", "EIO", "safetensors-ENOSPC"])
def test_injected_write_errors_name_the_hidden_states_file(tmp_path, monkeypatch, raised, expected):
    import bindweave.io.inputs as data

    def save_file(tensors, temp_path, metadata=None):
        Path(temp_path).write_bytes(b"half a file")
        raise raised

    monkeypatch.setattr(data, "save_file", save_file)
    path = tmp_path / "hidden_states" / "case.safetensors"
    with pytest.raises(BindWeaveInputError) as info:
        too_big_hidden_states(path)
    message = str(info.value)
    assert message.startswith(expected.format(path=path)) and str(path) in message, message
    assert f"nothing was written to {path.name} and the files written before it are kept." in message
    assert os.listdir(path.parent) == []


def test_a_writer_error_on_a_nearly_full_disk_is_disk_full(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError("... unexpected pos ..."), no errno: the free
    space of the folder, measured before the temp file is removed, tells."""
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    path = tmp_path / "case_hidden_states.pt"
    with pytest.raises(BindWeaveInputError, match="Disk full while writing"):
        with atomic_write(path) as temp_path:
            temp_path.write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert os.listdir(tmp_path) == []


def test_a_writer_bug_is_not_reported_as_a_disk_problem(tmp_path):
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with atomic_write(tmp_path / "x.pt") as temp_path:
            temp_path.write_bytes(b"partial")
            raise RuntimeError("unexpected pos 576 vs 534")
    assert os.listdir(tmp_path) == []


def test_mp4_problem_finds_every_truncation(tmp_path):
    path = tmp_path / "case.mp4"
    write_mp4(path, frames(count=3))
    data = path.read_bytes()
    assert outputs.mp4_problem(path, 3) is None
    assert outputs.mp4_problem(path, 4) == "3 frames instead of 4"
    cut = tmp_path / "cut.mp4"
    for keep in range(0, len(data), 97):
        cut.write_bytes(data[:keep])
        assert outputs.mp4_problem(cut, 3) is not None, keep


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_follows_the_umask(tmp_path, umask):
    """MP4, JSON and hidden states (safetensors creates its files 0600) get 0o666 & ~umask."""
    from bindweave.io.inputs import save_hidden_states

    old = os.umask(umask)
    try:
        write_mp4(tmp_path / "case.mp4", frames(count=1))
        write_json(tmp_path / "case.json", {"a": 1})
        save_hidden_states(tmp_path / "case.safetensors", torch.randn(1, 3, 8), torch.randn(1, 2, 8), {})
        assert outputs.current_umask() == umask
    finally:
        os.umask(old)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["case.mp4", "case.json", "case.safetensors"], 0o666 & ~umask), \
        {name: oct(mode) for name, mode in modes.items()}
