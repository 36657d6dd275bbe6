"""Writing outputs (videos, JSON sidecars, hidden-state files) so that no partial file is ever left.

Every writer goes through `atomic_write`: the data lands in a hidden temp file in the target
folder and is renamed over the final name only when complete. An interrupted run therefore
leaves either the old file or the new one, and `video_done` can trust what exists.

"Complete" is checked, not assumed: imageio's ffmpeg writer returns without error when ffmpeg
itself fails (a full disk while muxing, a crash), its exit code is never looked at, so
`write_mp4` reads the MP4's box structure back before the rename. Every file is flushed to the
disk (fsync) before its rename and gets the permissions of the umask, as `open()` would give it
(some writers, safetensors among them, create their files 0600).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import imageio.v2 as iio
import numpy as np

from bindweave.errors import BindWeaveInputError

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# The disk or the folder failed, not the program: reported as one line naming the file.
_DISK_ERRNOS = (errno.EIO, errno.EROFS, errno.EFBIG)
# Writers that do not raise OSError name the errno in their text: safetensors (Rust) says
# "(os error 28)".
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")
# A write that failed while the folder's disk has less than this free is taken for a full disk,
# whatever the writer raised (torch.save says "unexpected pos", ffmpeg says nothing at all). It
# is measured before the temp file is deleted, so the space the failed write took still counts.
_NEARLY_FULL_BYTES = 1 << 20


class IncompleteFileError(Exception):
    """A writer returned (or stopped) without a usable error, but its file is not complete."""


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; move it onto `path` only if the block succeeds.

    The temp name is `.{name}.{pid}.tmp{suffix}`: hidden, unique per process, and ending in the
    real suffix so writers that pick a format from the extension (imageio, safetensors) work.
    Before the rename the temp file gets the umask's permissions (0o666 & ~umask) and is flushed
    to the disk. On any exception, KeyboardInterrupt included, the temp file is deleted and the
    exception re-raised; a full disk, an I/O error or an incomplete file (IncompleteFileError)
    becomes one BindWeaveInputError naming `path` and saying what was kept.
    """
    path = Path(path)
    require_writable_folder(path.parent)
    temp_path = path.parent / f".{path.name}.{os.getpid()}.tmp{path.suffix}"
    try:
        yield temp_path
        _finish(temp_path)
        os.replace(temp_path, path)
    except BaseException as exc:
        error = _write_error(path, exc)  # before the unlink: the failed write's space still counts
        temp_path.unlink(missing_ok=True)
        if error is not None:
            raise error from exc
        raise


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc; elsewhere set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish(temp_path: Path) -> None:
    """Give the finished temp file the umask's permissions and flush it to the disk.

    fsync also surfaces a write error that the disk reports late (NFS and other network file
    systems report a full disk at close or fsync, not at write)."""
    try:
        os.chmod(temp_path, 0o666 & ~current_umask())
    except PermissionError:  # a file system without permission bits: keep what it gave
        pass
    fd = os.open(temp_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _errnos(exc: BaseException) -> set[int]:
    """The errnos of `exc` and of the exceptions it was raised from or while handling."""
    found, seen = set(), set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            found.add(exc.errno)
        found.update(int(number) for number in _OS_ERROR_IN_TEXT.findall(str(exc)))
        exc = exc.__cause__ or exc.__context__
    return found


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _write_error(path: Path, exc: BaseException) -> BindWeaveInputError | None:
    """The one-line error for a write of `path` that failed with `exc`, or None to re-raise `exc`.

    KeyboardInterrupt, SystemExit and the like are never turned into input errors."""
    if not isinstance(exc, Exception) or isinstance(exc, BindWeaveInputError):
        return None
    kept = (f"{path.name} keeps its previous content" if path.exists() else
            f"nothing was written to {path.name}") + " and the files written before it are kept"
    numbers = _errnos(exc)
    if numbers & set(_DISK_FULL_ERRNOS) or (not numbers & set(_DISK_ERRNOS) and _nearly_full(path.parent)):
        return BindWeaveInputError(
            f"Disk full while writing {path}: {kept}. Free some space on that disk or choose another "
            f"folder (output_dir=...)."
        )
    for number in _DISK_ERRNOS:
        if number in numbers:
            return BindWeaveInputError(
                f"Cannot write {path} ({os.strerror(number)}): {kept}. Check that disk or choose "
                f"another folder (output_dir=...)."
            )
    if isinstance(exc, IncompleteFileError):
        return BindWeaveInputError(
            f"Cannot write {path}: {exc}; {kept}. Run the same command again to redo it; if it "
            f"fails again, check that disk and the video writer (ffmpeg)."
        )
    return None


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


def write_latents(path: str | os.PathLike, latents) -> None:
    """The final denoised latents (fp32, key ``latents``) beside a video, atomically: what
    ``launch/compare.py`` measures a fast mode's error on, before the VAE and the MP4 codec."""
    from safetensors.torch import save_file

    with atomic_write(path) as temp_path:
        save_file({"latents": latents.detach().float().cpu().contiguous()}, str(temp_path))


def latents_path(video_path: Path) -> Path:
    return video_path.with_suffix(".latents.safetensors")


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
    BindWeaveInputError for an odd size (a resolution the user chose) or a video that could not
    be finished (full disk, ffmpeg failure): the MP4 is checked (`mp4_problem`) before it gets its
    name, since imageio does not report a failed ffmpeg.
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
            try:
                for frame in frames:
                    writer.append_data(frame)
            finally:
                writer.close()
        except OSError as error:
            if error.errno not in (None, errno.EPIPE):
                raise
            # imageio's text when ffmpeg has exited early: the broken pipe and ffmpeg's command line
            raise IncompleteFileError("the video writer (ffmpeg) stopped before the last frame") from error
        # imageio ignores ffmpeg's exit code: a video ffmpeg could not finish must not get its name.
        problem = mp4_problem(temp_path, len(frames))
        if problem is not None:
            raise IncompleteFileError(f"the video writer (ffmpeg) left an incomplete MP4 ({problem})")


def mp4_problem(path: str | os.PathLike, frames: int) -> str | None:
    """Why the MP4 at `path` is not a complete video of `frames` frames, or None if it is.

    Reads only the box headers and the `moov` box: the top-level boxes must tile the file exactly,
    `mdat` and `moov` must be there (ffmpeg writes `moov` last), and the video track's sample table
    (`stsz`) must count `frames` samples.
    """
    path = Path(path)
    size = path.stat().st_size
    kinds, moov, offset = set(), b"", 0
    with open(path, "rb") as file:
        while offset < size:
            file.seek(offset)
            box = _box_header(file.read(16), size - offset)
            if box is None:
                return f"it is cut off at byte {offset} of {size}"
            kind, header_size, box_size = box
            kinds.add(kind)
            if kind == b"moov":
                file.seek(offset + header_size)
                moov = file.read(box_size - header_size)
            offset += box_size
    for kind in (b"mdat", b"moov"):
        if kind not in kinds:
            return f"no {kind.decode()} box in its {size} bytes"
    count = _video_sample_count(moov)
    if count is None:
        return "no video track in its moov box"
    if count != frames:
        return f"{count} frames instead of {frames}"
    return None


def _box_header(data: bytes, room: int) -> tuple[bytes, int, int] | None:
    """(kind, header size, box size) of the box starting `data`, or None if it does not fit in `room`."""
    if len(data) < 8 or room < 8:
        return None
    box_size, kind = struct.unpack(">I4s", data[:8])
    header_size = 8
    if box_size == 1:  # 64-bit size after the kind
        if len(data) < 16:
            return None
        box_size, header_size = struct.unpack(">Q", data[8:16])[0], 16
    elif box_size == 0:  # to the end of the file
        box_size = room
    if box_size < header_size or box_size > room:
        return None
    return kind, header_size, box_size


def _children(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(kind, body) of each box in `data` (the body of a container box); stops at a malformed one."""
    offset = 0
    while offset < len(data):
        box = _box_header(data[offset:offset + 16], len(data) - offset)
        if box is None:
            return
        kind, header_size, box_size = box
        yield kind, data[offset + header_size:offset + box_size]
        offset += box_size


def _child(data: bytes, *path: bytes) -> bytes | None:
    for kind in path:
        data = next((body for child, body in _children(data) if child == kind), None)
        if data is None:
            return None
    return data


def _video_sample_count(moov: bytes) -> int | None:
    """The sample (frame) count of the first video track in a `moov` box body."""
    for kind, trak in _children(moov):
        if kind != b"trak":
            continue
        handler = _child(trak, b"mdia", b"hdlr")  # version+flags, pre_defined, handler type
        if handler is None or handler[8:12] != b"vide":
            continue
        sizes = _child(trak, b"mdia", b"minf", b"stbl", b"stsz")  # version+flags, sample size, count
        return struct.unpack(">I", sizes[8:12])[0] if sizes is not None and len(sizes) >= 12 else None
    return None


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
