"""The bad-input catalogue: every way a user can hand the launcher something wrong.

Each case goes through the real code (``run_batch`` on the tiny models in this process, the
real checkpoint loader, the real layout check, or ``launch/generate.py`` as a subprocess) and
checks the contract:

- one clear BindWeaveInputError naming the file/field/setting and how to fix it;
- no partial output: no MP4, sidecar or temp file for the failed sample;
- with ``on_error=skip`` the other samples of the run are written as if nothing happened;
- through the entry point: exit code 2 and exactly one ``error:`` line on stderr (Hydra's own
  config errors: Hydra's message and a non-zero exit).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bindweave.io.inputs import load_reference_image, save_hidden_states
from bindweave.errors import BindWeaveInputError
from bindweave.io.outputs import read_mp4_info
from bindweave.stages.batch import RunSettings
from support.engines import run_batch_on
from support.engines import build_models
from bindweave.settings.model import ModelSettings, VideoSettings
from bindweave.settings.sampling import SamplerSettings

REPO = Path(__file__).resolve().parents[1]
VIDEO = VideoSettings(height=48, width=64, num_frames=5)
SAMPLER = SamplerSettings(num_steps=2)
BAD, GOOD = "a_bad", "b_good"  # sorted: the bad sample runs first, the good one after it


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    settings = ModelSettings(dit=None, wan=None, tiny_root=str(tiny.bindweave.parent), dtype="float32",
                             device="cpu", cache_dir=str(tmp_path_factory.mktemp("cache")))
    return build_models(settings)


class Workspace:
    """A folder with one good reference image and good hidden states, and a meta JSON writer."""

    def __init__(self, root: Path, hidden_dim: int):
        self.root = root
        self.hidden_dim = hidden_dim
        (root / "images").mkdir(parents=True)
        image = Image.new("RGB", (80, 60), (200, 120, 40))
        image.paste((30, 60, 200), (20, 15, 60, 45))
        image.save(root / "images" / "good.png")
        generator = torch.Generator().manual_seed(0)
        save_hidden_states(root / "good.safetensors", torch.randn(1, 7, hidden_dim, generator=generator),
                           torch.randn(1, 9, hidden_dim, generator=generator), {})
        self.output = root / "out"

    def entry(self, **changes) -> dict:
        entry = {"img_paths": ["images/good.png"], "prompt": "A small orange box on a table.",
                 "hidden_states_path": "good.safetensors"}
        entry.update(changes)
        return {key: value for key, value in entry.items() if value is not None}

    def meta(self, bad_entry, good: bool = True, name: str = "meta.json") -> Path:
        meta = {BAD: bad_entry}
        if good:
            meta[GOOD] = self.entry()
        path = self.root / name
        path.write_text(json.dumps(meta))
        return path

    def run(self, meta_path: Path, **options) -> dict:
        settings = RunSettings(meta_path=meta_path, image_root=None, output_dir=self.output, progress=False,
                               **options)
        return run_batch_on(self._models, settings, VIDEO, SAMPLER)


@pytest.fixture
def ws(tmp_path, models):
    workspace = Workspace(tmp_path / "ws", models.hidden_dim)
    workspace._models = models
    return workspace


def leftovers(folder: Path, sample_id: str) -> list[str]:
    """Outputs of `sample_id` (final or temp) and any temp file at all in `folder`."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith((sample_id, f".{sample_id}")) or ".tmp" in p.name)


def assert_good_sample_written(folder: Path) -> None:
    info = read_mp4_info(folder / f"{GOOD}.mp4")
    assert (info["frames"], info["width"], info["height"]) == (VIDEO.num_frames, VIDEO.width, VIDEO.height)
    assert json.loads((folder / f"{GOOD}.json").read_text())["sample_id"] == GOOD


def check_bad_sample(ws: Workspace, bad_entry: dict, *must_name: str) -> str:
    """The catalogue contract for one bad sample; returns the error message.

    on_error=fail: one BindWeaveInputError naming every `must_name`, nothing written.
    on_error=skip: the bad sample is reported and skipped, the good one after it is written.
    """
    meta = ws.meta(bad_entry)
    with pytest.raises(BindWeaveInputError) as failed:
        ws.run(meta, on_error="fail")
    message = str(failed.value)
    for name in must_name:
        assert name in message, f"{name!r} not named in: {message}"
    assert leftovers(ws.output, BAD) == []
    assert not (ws.output / f"{GOOD}.mp4").exists()  # on_error=fail stops at the first bad sample

    summary = ws.run(meta, on_error="skip")
    assert list(summary["failed"]) == [BAD] and summary["done"] == [GOOD], summary
    assert summary["failed"][BAD] == message  # the same single message
    assert leftovers(ws.output, BAD) == []
    assert_good_sample_written(ws.output)
    return message


# --------------------------------------------------------------------------------------------
# the meta JSON


@pytest.mark.parametrize("text, must_name", [
    ("[1, 2]", "must be an object mapping sample ids"),
    ('{"a": {"img_paths": ["x.png"], "prompt": "p"}', "not valid JSON"),  # missing brace
    ("{}", "holds no samples"),
    ("", "not valid JSON"),  # an empty (0-byte) file
    (b"\xff\xfe{}", "not UTF-8"),
], ids=["not-a-dict", "bad-json", "no-samples", "empty-file", "not-utf8"])
def test_meta_file_unusable(ws, text, must_name):
    meta = ws.root / "meta.json"
    meta.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(BindWeaveInputError) as error:
        ws.run(meta, on_error="skip")  # a broken meta file stops the run even with skip
    assert str(meta) in str(error.value) and must_name in str(error.value)
    assert not ws.output.exists() or not list(ws.output.iterdir())


def test_meta_file_missing(ws):
    with pytest.raises(BindWeaveInputError, match="does not exist: check the path"):
        ws.run(ws.root / "nope.json")


@pytest.mark.parametrize("field", ["img_paths", "prompt"])
def test_sample_missing_a_field_is_named(ws, field):
    """A sample without img_paths/prompt: the error names the sample and the field."""
    meta = ws.meta(ws.entry(**{field: None}))
    with pytest.raises(BindWeaveInputError) as error:
        ws.run(meta, on_error="fail")
    assert BAD in str(error.value) and f'"{field}"' in str(error.value)
    assert leftovers(ws.output, BAD) == []


@pytest.mark.parametrize("field", ["img_paths", "prompt"])
def test_sample_missing_a_field_is_skipped_with_on_error_skip(ws, field):
    check_bad_sample(ws, ws.entry(**{field: None}), BAD, field)


def test_sample_not_an_object(ws):
    meta = ws.meta("just a prompt")
    with pytest.raises(BindWeaveInputError, match=f"sample '{BAD}': the sample is a string"):
        ws.run(meta)


# --------------------------------------------------------------------------------------------
# reference images


def test_image_missing(ws):
    check_bad_sample(ws, ws.entry(img_paths=["images/nope.png"]), "nope.png", "does not exist", "img_paths")


def test_image_not_an_image(ws):
    (ws.root / "images" / "notes.png").write_text("these are my notes, not a picture")
    check_bad_sample(ws, ws.entry(img_paths=["images/notes.png"]), "notes.png", "replace it with a JPEG or PNG")


def test_image_unreadable_permissions(ws, monkeypatch):
    path = ws.root / "images" / "locked.png"
    shutil.copy(ws.root / "images" / "good.png", path)
    real_open = Image.open

    def deny(fp, *args, **kwargs):  # root ignores chmod 000, so refuse the open as the kernel would
        if Path(fp).name == "locked.png":
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", deny)
    check_bad_sample(ws, ws.entry(img_paths=["images/locked.png"]), "locked.png", "could not be decoded")


def test_image_truncated(ws):
    buffer = ws.root / "images" / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buffer)
    data = buffer.read_bytes()
    buffer.write_bytes(data[: len(data) // 2])
    check_bad_sample(ws, ws.entry(img_paths=["images/big.jpg"]), "big.jpg", "truncated")


def test_image_zero_bytes(ws):
    (ws.root / "images" / "empty.png").write_bytes(b"")
    check_bad_sample(ws, ws.entry(img_paths=["images/empty.png"]), "empty.png", "0 bytes", "download it again")


def _png_claiming_size(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (nothing else needs to be valid to be refused)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
                     + struct.pack(">I", zlib.crc32(chunk)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")


@pytest.mark.parametrize("width, height", [(10_000, 8_000), (20_000, 20_000)], ids=["over-limit", "pil-bomb"])
def test_image_huge_is_refused(ws, width, height):
    _png_claiming_size(ws.root / "images" / "huge.png", width, height)
    message = check_bad_sample(ws, ws.entry(img_paths=["images/huge.png"]), "huge.png", "too large", "Downscale")
    assert "64,000,000" in message


def _cmyk(path):
    Image.new("CMYK", (70, 50), (0, 128, 255, 20)).save(path)


def _sixteen_bit(path):
    Image.fromarray(np.full((50, 70), 32768, dtype=np.uint16)).save(path)


def _alpha(path):
    image = Image.new("RGBA", (70, 50), (255, 255, 255, 0))
    image.paste((250, 10, 10, 255), (20, 10, 50, 40))
    image.save(path)


@pytest.mark.parametrize("name, write, check", [
    ("cmyk.jpg", _cmyk, lambda px: px[35, 25][2] < 60 and px[35, 25][0] > 150),  # CMYK (0,128,255,20): orange-red
    ("grey16.png", _sixteen_bit, lambda px: px[35, 25] == (128, 128, 128)),       # 16-bit mid grey, not white
    ("alpha.png", _alpha, lambda px: px[0, 0] == (0, 0, 0) and px[35, 25] == (250, 10, 10)),
], ids=["cmyk", "16-bit", "alpha"])
def test_unusual_image_modes_are_converted_and_run(ws, name, write, check):
    write(ws.root / "images" / name)
    image = load_reference_image(ws.root / "images" / name)
    assert image.mode == "RGB" and check(image.load()), image.load()[35, 25]
    meta = ws.meta(ws.entry(img_paths=[f"images/{name}"]), good=False)
    assert ws.run(meta)["done"] == [BAD]
    assert read_mp4_info(ws.output / f"{BAD}.mp4")["frames"] == VIDEO.num_frames


def test_more_than_four_references_warns_and_runs(ws):
    paths = []
    for index in range(6):
        path = ws.root / "images" / f"ref{index}.png"
        Image.new("RGB", (40 + index, 30), (index * 40, 80, 120)).save(path)
        paths.append(f"images/ref{index}.png")
    meta = ws.meta(ws.entry(img_paths=paths), good=False)
    with pytest.warns(UserWarning) as warned:
        summary = ws.run(meta)
    messages = [str(w.message) for w in warned if BAD in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in warned]
    assert "images/ref4.png" in messages[0] and "images/ref5.png" in messages[0] and "at most 4" in messages[0]
    assert summary["done"] == [BAD]
    assert [Path(p).name for p in json.loads((ws.output / f"{BAD}.json").read_text())["images"]] == [
        "ref0.png", "ref1.png", "ref2.png", "ref3.png"]


# --------------------------------------------------------------------------------------------
# hidden-state files (stage 2's output)


def test_hidden_states_field_missing(ws):
    check_bad_sample(ws, ws.entry(hidden_states_path=None), "hidden_states_path", "run stage 2")


def test_hidden_states_file_missing(ws):
    check_bad_sample(ws, ws.entry(hidden_states_path="gone.safetensors"), "gone.safetensors", "does not exist")


def test_hidden_states_wrong_shape(ws):
    save_hidden_states(ws.root / "narrow.safetensors", torch.zeros(1, 5, 7), torch.zeros(1, 5, 7), {})
    check_bad_sample(ws, ws.entry(hidden_states_path="narrow.safetensors"), "narrow.safetensors",
                     "[1, 5, 7]", f"[1, L, {ws.hidden_dim}]")


def test_hidden_states_wrong_dtype(ws):
    torch.save(torch.ones(5, ws.hidden_dim, dtype=torch.int64), ws.root / "ints.pt")
    torch.save(torch.ones(5, ws.hidden_dim), ws.root / "neg.pt")
    check_bad_sample(ws, ws.entry(hidden_states_path="ints.pt", hidden_states_path_negative="neg.pt"),
                     "ints.pt", "torch.int64", "bfloat16, float16 or float32")


def test_hidden_states_nan(ws):
    positive = torch.zeros(1, 5, ws.hidden_dim)
    positive[0, 2, 3] = float("nan")
    save_file({"positive": positive, "negative": torch.zeros(1, 5, ws.hidden_dim)}, ws.root / "nan.safetensors")
    check_bad_sample(ws, ws.entry(hidden_states_path="nan.safetensors"), "nan.safetensors", "NaN",
                     "re-run stage 2")


def test_hidden_states_pickle_of_a_dict(ws):
    torch.save({"hidden": torch.zeros(5, ws.hidden_dim)}, ws.root / "dict.pt")
    torch.save(torch.zeros(5, ws.hidden_dim), ws.root / "neg.pt")
    check_bad_sample(ws, ws.entry(hidden_states_path="dict.pt", hidden_states_path_negative="neg.pt"),
                     "dict.pt", "holds a dict, not a tensor")


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (str(_Payload.marker),))


def test_hidden_states_pickle_with_code_is_never_run(ws):
    _Payload.marker = ws.root / "payload-ran"
    with open(ws.root / "evil.pt", "wb") as file:
        pickle.dump(_Payload(), file, protocol=2)
    torch.save(torch.zeros(5, ws.hidden_dim), ws.root / "neg.pt")
    check_bad_sample(ws, ws.entry(hidden_states_path="evil.pt", hidden_states_path_negative="neg.pt"),
                     "evil.pt", "refused by the safe loader", "one bare tensor")
    assert not _Payload.marker.exists()


def test_hidden_states_safetensors_without_negative(ws):
    save_file({"positive": torch.zeros(1, 5, ws.hidden_dim)}, ws.root / "half.safetensors")
    check_bad_sample(ws, ws.entry(hidden_states_path="half.safetensors"), "half.safetensors", "'negative'",
                     "re-run stage 2")


def test_hidden_states_garbage_file(ws):
    (ws.root / "junk.safetensors").write_bytes(os.urandom(300))
    check_bad_sample(ws, ws.entry(hidden_states_path="junk.safetensors"), "junk.safetensors",
                     "not a readable safetensors file")


# --------------------------------------------------------------------------------------------
# checkpoint folders


@pytest.fixture
def dit_copy(tiny, tmp_path):
    folder = tmp_path / "BindWeave"
    shutil.copytree(tiny.bindweave, folder)
    return folder


def load_with_dit(tiny, dit_folder, tmp_path):
    settings = ModelSettings(dit=str(dit_folder), wan=str(tiny.wan), dtype="float32", device="cpu",
                             cache_dir=str(tmp_path / "cache"))
    return build_models(settings)


def test_checkpoint_folder_missing(tiny, tmp_path):
    with pytest.raises(BindWeaveInputError, match="does not exist and is not a Hugging Face repo id"):
        load_with_dit(tiny, tmp_path / "no" / "such" / "folder", tmp_path)


def test_checkpoint_folder_without_weight_files(tiny, dit_copy, tmp_path):
    for path in dit_copy.glob("*.safetensors"):
        path.unlink()
    with pytest.raises(BindWeaveInputError, match="holds no \\*.safetensors files") as error:
        load_with_dit(tiny, dit_copy, tmp_path)
    assert str(dit_copy) in str(error.value)


def test_checkpoint_shard_missing(tiny, dit_copy, tmp_path):
    (weights,) = dit_copy.glob("*.safetensors")
    keys = list(load_file(weights))
    index = {"metadata": {}, "weight_map": {key: ("part-1.safetensors" if i % 2 else weights.name)
                                            for i, key in enumerate(keys)}}
    (dit_copy / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BindWeaveInputError, match="part-1.safetensors.*finish the download"):
        load_with_dit(tiny, dit_copy, tmp_path)


def test_checkpoint_missing_keys(tiny, dit_copy, tmp_path):
    (weights,) = dit_copy.glob("*.safetensors")
    state = load_file(weights)
    dropped = sorted(state)[:3]
    save_file({k: v for k, v in state.items() if k not in dropped}, weights)
    with pytest.raises(BindWeaveInputError) as error:
        load_with_dit(tiny, dit_copy, tmp_path)
    assert "3 missing keys" in str(error.value) and dropped[0] in str(error.value)
    assert "download is complete" in str(error.value)


def test_checkpoint_wrong_shape(tiny, dit_copy, tmp_path):
    (weights,) = dit_copy.glob("*.safetensors")
    state = load_file(weights)
    key = next(k for k, v in sorted(state.items()) if v.ndim == 2)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, weights)
    with pytest.raises(BindWeaveInputError, match="1 wrong shapes") as error:
        load_with_dit(tiny, dit_copy, tmp_path)
    assert key in str(error.value)


def test_checkpoint_truncated_file(tiny, dit_copy, tmp_path):
    (weights,) = dit_copy.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BindWeaveInputError, match="not a readable safetensors file.*re-download"):
        load_with_dit(tiny, dit_copy, tmp_path)


# --------------------------------------------------------------------------------------------
# parallel layout


@pytest.mark.parametrize("degrees, world, must_name", [
    ({"ulysses": 3}, 3, "ulysses=3 does not divide the model's 40 attention heads"),
    ({"data": 2, "ulysses": 2}, 2, "multiply to 4 but 2 process(es) were started"),
    ({"cfg": 4}, 4, "use cfg=1 or cfg=2"),
    ({"ring": 2}, 2, "needs the xfuser backend"),
], ids=["ulysses-vs-heads", "product-vs-world", "cfg-4", "ring-on-cpu"])
def test_parallel_degrees_that_do_not_fit(degrees, world, must_name):
    from bindweave.settings.parallel import ParallelSettings
    from parallel.layout import layout_from_config

    with pytest.raises(BindWeaveInputError) as error:
        layout_from_config(ParallelSettings(**degrees), world, 40, "cpu")
    assert must_name in str(error.value), str(error.value)


# --------------------------------------------------------------------------------------------
# the output folder and the disk


def test_output_folder_not_writable(ws, monkeypatch):
    import bindweave.io.outputs as outputs

    real_access = os.access
    monkeypatch.setattr(outputs.os, "access",  # root passes any permission check, so deny as for a user
                        lambda path, mode: False if Path(path) == ws.output else real_access(path, mode))
    meta = ws.meta(ws.entry())
    with pytest.raises(BindWeaveInputError, match="is not writable.*output_dir=") as error:
        ws.run(meta)
    assert str(ws.output) in str(error.value)
    assert list(ws.output.iterdir()) == []


def test_disk_full_while_writing_the_video(ws, monkeypatch):
    import bindweave.io.outputs as outputs

    real_writer = outputs.iio.get_writer

    def writer(path, *args, **kwargs):
        handle = real_writer(path, *args, **kwargs)
        if BAD in Path(path).name:
            def full(frame):
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.append_data = full
        return handle

    monkeypatch.setattr(outputs.iio, "get_writer", writer)
    message = check_bad_sample(ws, ws.entry(), f"{BAD}.mp4", "Disk full", "Free some space")
    assert "nothing was written" in message


def test_disk_full_while_writing_the_sidecar_leaves_the_sample_unfinished(ws, monkeypatch):
    """The sidecar marks a sample finished: if it cannot be written the re-run redoes the sample."""
    import bindweave.io.outputs as outputs

    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(f".{BAD}.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(outputs.Path, "write_text", write_text)
    summary = ws.run(ws.meta(ws.entry()), on_error="skip")
    assert list(summary["failed"]) == [BAD] and "Disk full" in summary["failed"][BAD]
    assert not (ws.output / f"{BAD}.json").exists()
    assert not [p for p in ws.output.iterdir() if ".tmp" in p.name]
    assert_good_sample_written(ws.output)
    monkeypatch.undo()  # space freed: the re-run finishes exactly the unfinished sample
    summary = ws.run(ws.meta(ws.entry()))
    assert summary["done"] == [BAD] and summary["skipped"] == [GOOD]


# --------------------------------------------------------------------------------------------
# through the entry point (a subprocess each: exit code and stderr as a user sees them)


TINY_RUN = ["sampler.num_steps=2", "video.height=48", "video.width=64", "video.num_frames=5", "progress=false"]


def generate(tmp_path, *overrides, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for name in list(env):
        if name.startswith("SLURM_") or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            del env[name]  # run as one plain process even inside an allocation
    return subprocess.run([sys.executable, str(REPO / "launch/generate.py"), *TINY_RUN, *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides, must_name", [
    (["parallel=ulysses2"], "multiply to 2 but 1 process(es) were started"),
], ids=["layout-vs-world"])
def test_entry_point_bad_setting_exits_2_with_one_error_line(tmp_path, overrides, must_name):
    """A setting the schema accepts but the job cannot run (the schema's own refusals, e.g.
    video.height=50 or on_error=maybe, are tested in-process in tests/test_config.py, and one of them
    through the entry point there)."""
    result = generate(tmp_path, f"output_dir={tmp_path / 'out'}", *overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and must_name in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.mp4"))


@pytest.mark.timeout(300)
def test_entry_point_output_dir_is_a_file(tmp_path, models):
    ws = Workspace(tmp_path / "ws", models.hidden_dim)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    result = generate(tmp_path, f"output_dir={blocker / 'out'}", f"data.meta_path={ws.meta(ws.entry())}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and str(blocker) in lines[0] and "output_dir=" in result.stderr, result.stderr[-3000:]


@pytest.mark.timeout(300)
def test_entry_point_on_error_skip_reports_the_bad_sample_and_exits_1(tmp_path, models):
    ws = Workspace(tmp_path / "ws", models.hidden_dim)
    out = tmp_path / "out"
    result = generate(tmp_path, f"output_dir={out}", "on_error=skip",
                      f"data.meta_path={ws.meta(ws.entry(hidden_states_path='gone.safetensors'))}")
    assert result.returncode == 1, result.stderr[-3000:]
    # Reported before loading, then in the closing list of failed samples (also in failed.json).
    assert result.stderr.count("a_bad: hidden_states_path") == 2, result.stderr[-3000:]
    assert list(json.loads((out / "failed.json").read_text())) == ["a_bad"]
    assert leftovers(out, BAD) == []
    assert_good_sample_written(out)


# --------------------------------------------------------------------------------------------
# sample ids are file names: an id that is a path is refused before anything is written


ESCAPING_ID = "../../escaped_sample"


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


def escaping_workspace(tmp_path: Path, hidden_dim: int) -> tuple[Path, Path, Path]:
    """(area, meta JSON, output folder): the meta JSON holds the escaping id and a good sample; the output
    folder sits two levels down in `area`, so `<output_dir>/../../escaped_sample.mp4` would land in it.
    (The subprocess writes its tiny models to <cwd>/.cache, outside `area`.)"""
    area = tmp_path / "area"
    ws = Workspace(area / "ws", hidden_dim)
    meta = ws.root / "escape.json"
    meta.write_text(json.dumps({ESCAPING_ID: ws.entry(), GOOD: ws.entry()}))
    return area, meta, area / "runs" / "job" / "out"


def assert_escaping_id_refused(result: subprocess.CompletedProcess, meta: Path) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    assert repr(ESCAPING_ID) in lines[0] and str(meta) in lines[0] and "path separator '/'" in lines[0], lines[0]
    assert "rename the key in the meta JSON" in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(300)
def test_entry_point_sample_id_escaping_the_output_folder_writes_nothing(tmp_path, models):
    area, meta, out = escaping_workspace(tmp_path, models.hidden_dim)
    before = files_under(area)
    result = generate(tmp_path, f"output_dir={out}", f"data.meta_path={meta}")
    assert_escaping_id_refused(result, meta)
    assert files_under(area) == before  # neither escaped_sample.* above out/ nor anything inside it
    assert not list(tmp_path.rglob("escaped_sample*")) and not list(tmp_path.rglob(".escaped_sample*"))


@pytest.mark.timeout(300)
def test_entry_point_sample_id_escaping_is_skipped_with_on_error_skip(tmp_path, models):
    _, meta, out = escaping_workspace(tmp_path, models.hidden_dim)
    result = generate(tmp_path, f"output_dir={out}", f"data.meta_path={meta}", "on_error=skip")
    assert result.returncode == 1, result.stderr[-3000:]
    assert repr(ESCAPING_ID) in result.stderr and "path separator '/'" in result.stderr, result.stderr[-3000:]
    assert not list(tmp_path.rglob("escaped_sample*")) and not list(tmp_path.rglob(".escaped_sample*"))
    assert_good_sample_written(out)


def extract_command(tmp_path, *overrides, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for name in list(env):
        if name.startswith("SLURM_") or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            del env[name]
    return subprocess.run([sys.executable, str(REPO / "launch/extract.py"), "progress=false", "qwen.device=cpu",
                           *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_stage2_entry_point_sample_id_escaping_the_output_folder_writes_nothing(tmp_path, tiny):
    area, meta, out = escaping_workspace(tmp_path, 8)
    before = files_under(area)
    result = extract_command(tmp_path, f"output_dir={out}", f"data.meta_path={meta}",
                             f"qwen.tiny_root={tiny.qwen.parent}")
    assert_escaping_id_refused(result, meta)
    # No hidden_states/, no meta_with_features.json, nothing above out/. The stage-2 entry point saves
    # its resolved config in <output_dir>/.hydra/ before it reads the meta JSON: that alone is allowed.
    written = files_under(area) - before
    assert all(path.is_relative_to(out / ".hydra") for path in written), sorted(written)
    assert not list(tmp_path.rglob("escaped_sample*")) and not list(tmp_path.rglob(".escaped_sample*"))
