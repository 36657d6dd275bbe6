"""Writing outputs (videos, JSON sidecars, hidden-state files) so that no partial file is ever left.

Every writer goes through `atomic_write`: the data lands in a hidden temp file in the target
folder and is renamed over the final name only when complete. An interrupted run therefore
leaves either the old file or the new one, and `video_done` can trust what exists.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import imageio.v2 as iio
import numpy as np

from bindweave.errors import BindWeaveInputError

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; move it onto `path` only if the block succeeds.

    The temp name is `.{name}.{pid}.tmp{suffix}`: hidden, unique per process, and ending in the
    real suffix so writers that pick a format from the extension (imageio, safetensors) work.
    On any exception, KeyboardInterrupt included, the temp file is deleted and the exception
    re-raised; a full disk becomes a BindWeaveInputError naming `path`.
    """
    path = Path(path)
    require_writable_folder(path.parent)
    temp_path = path.parent / f".{path.name}.{os.getpid()}.tmp{path.suffix}"
    try:
        yield temp_path
        os.replace(temp_path, path)
    except BaseException as exc:
        temp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            raise BindWeaveInputError(
                f"Disk full while writing {path}: nothing was written. Free some space on that "
                f"disk or choose another folder (output_dir=...)."
            ) from exc
        raise


def require_writable_folder(folder: Path) -> None:
    """Create `folder` if needed and check that files can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BindWeaveInputError(
            f"Cannot create the output folder {folder} ({exc.strerror}): choose another folder "
            f"(output_dir=...)."
        ) from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BindWeaveInputError(
            f"The output folder {folder} is not writable: fix its permissions or choose another "
            f"folder (output_dir=...)."
        )


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write `obj` as indented UTF-8 JSON, atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    with atomic_write(path) as temp_path:
        temp_path.write_text(text, encoding="utf-8")


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 16, quality: int = 6) -> None:
    """Write uint8 frames `[F, H, W, 3]` as an H.264 yuv420p MP4, atomically.

    quality 6 is imageio's scale for about CRF 20, the reference's setting (SPEC §6). H and W
    must be even (yuv420p halves the chroma planes); frames are never resized.
    Raises ValueError for frames of the wrong type or layout (a bug in the caller), and
    BindWeaveInputError for an odd size (a resolution the user chose).
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(f"frames must be a uint8 numpy array, got {type(frames).__name__} "
                         f"{getattr(frames, 'dtype', '')}")
    if frames.ndim != 4 or frames.shape[0] < 1 or frames.shape[3] != 3:
        raise ValueError(f"frames must have shape [F>=1, H, W, 3], got {list(frames.shape)}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise BindWeaveInputError(
            f"Cannot write {path}: the video size {width}x{height} has an odd side, which H.264 "
            f"yuv420p cannot store. Choose an even height and width."
        )
    with atomic_write(path) as temp_path:
        # macro_block_size=1: imageio would otherwise resize frames to multiples of 16.
        writer = iio.get_writer(temp_path, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                quality=quality, pixelformat="yuv420p", macro_block_size=1)
        # Closed on every path, before atomic_write deletes the temp file: imageio's __exit__ skips
        # close() while an exception is in flight, and ffmpeg would recreate the file later.
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()


def video_done(path: str | os.PathLike) -> bool:
    """True when the MP4 and its JSON sidecar both exist.

    The sidecar (`path.with_suffix('.json')`) is written after the MP4, so its presence marks a
    finished sample; a resumed run skips it.
    """
    path = Path(path)
    return path.is_file() and path.with_suffix(".json").is_file()


def read_mp4_info(path: str | os.PathLike) -> dict:
    """Return `{frames, fps, width, height}` of an MP4 (frames counted by decoding)."""
    path = Path(path)
    if not path.is_file():
        raise BindWeaveInputError(f"Video {path} does not exist: check the path.")
    with iio.get_reader(path, format="FFMPEG") as reader:
        meta = reader.get_meta_data()
        width, height = meta["size"]
        return {"frames": reader.count_frames(), "fps": meta["fps"], "width": width,
                "height": height}
