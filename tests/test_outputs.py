"""Writing outputs atomically (bindweave/outputs.py)."""

import errno
import json
import os

import numpy as np
import pytest

from bindweave import outputs
from bindweave.errors import BindWeaveInputError
from bindweave.outputs import atomic_write, read_mp4_info, video_done, write_json, write_mp4


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
