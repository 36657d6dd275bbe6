"""Stage 2: hidden-state extraction (bindweave/stages/extract.py, launch/extract.py), SPEC §3 and §7."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bindweave.io.inputs import load_reference_image, load_sample_hidden_states, read_meta
from bindweave.testing.demo import demo_meta_with_hidden_states
from bindweave.testing.demo_cases import write_demo_cases
from bindweave.app.config import compose_config
from bindweave.errors import BindWeaveInputError
from bindweave.app.extract import run_extract_command
from bindweave.stages.extract import ExtractSettings, SampleFiles, run_extract
from bindweave.encoders.prompts import QWEN_NEGATIVE_PROMPT
from bindweave.encoders.qwen import build_inputs, load_qwen, prescale_references
from bindweave.settings.qwen import QwenSettings

REPO = Path(__file__).resolve().parents[1]
from conftest import OPENS2V, needs_opens2v  # noqa: E402
TINY_HIDDEN = 40  # the tiny Qwen's hidden size = the tiny DiT's mllm_dim


@pytest.fixture(scope="session")
def tiny_root(tiny_models):
    return tiny_models.qwen.parent


@pytest.fixture(scope="session")
def qwen(tiny_root):
    return load_qwen(QwenSettings(tiny_root=str(tiny_root), device="cpu"))


@pytest.fixture(scope="session")
def demo_meta(tmp_path_factory):
    return write_demo_cases(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def extracted(qwen, demo_meta, tmp_path_factory):
    """One extraction of the demo cases: (output folder, new meta JSON, backbone forward calls)."""
    output = tmp_path_factory.mktemp("extracted")
    with ForwardRecorder(qwen) as recorder:
        written = extract(qwen, demo_meta, output)
    return output, written, recorder.calls


class ForwardRecorder:
    """Records every forward of the Qwen2.5-VL backbone (vision + language model) with its inputs."""

    def __init__(self, qwen):
        self.calls = []
        self.hook = qwen.model.model.register_forward_pre_hook(
            lambda module, args, kwargs: self.calls.append(kwargs), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hook.remove()


def extract(qwen, meta, output_dir, **options):
    settings = ExtractSettings(output_dir=output_dir, progress=False, **options)
    return run_extract(qwen, meta, meta.parent, settings)


def header(path):
    with safe_open(path, framework="pt") as handle:
        return handle.metadata()


def tensors(path):
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


# ---- what is saved ----------------------------------------------------------------------------


def test_saved_states_are_last_hidden_state_of_both_prompts(qwen, demo_meta, extracted):
    _, written, _ = extracted
    sample = next(s for s in read_meta(written, demo_meta.parent) if len(s.image_paths) == 2)
    saved = tensors(sample.hidden_states_path)
    images = prescale_references([load_reference_image(p) for p in sample.image_paths])
    for key, text in (("positive", sample.prompt), ("negative", QWEN_NEGATIVE_PROMPT)):
        # Independent of the code under test's forward: the full model's hidden_states[-1].
        with torch.no_grad():
            output = qwen.model(**build_inputs(qwen, text, images), output_hidden_states=True)
        expected = output.hidden_states[-1].to(torch.bfloat16)
        assert saved[key].dtype == torch.bfloat16
        assert torch.equal(saved[key], expected)
    info = header(sample.hidden_states_path)
    assert info["positive_length"] == str(saved["positive"].shape[1])
    assert info["negative_length"] == str(saved["negative"].shape[1])
    assert len(json.loads(info["image_tokens"])) == 2


def test_positive_and_negative_use_the_same_images(qwen, demo_meta, extracted):
    _, _, calls = extracted
    samples = read_meta(demo_meta)
    assert len(calls) == 2 * len(samples)
    for sample, positive, negative in zip(samples, calls[0::2], calls[1::2]):
        assert torch.equal(positive["pixel_values"], negative["pixel_values"])
        assert torch.equal(positive["image_grid_thw"], negative["image_grid_thw"])
        assert len(positive["image_grid_thw"]) == len(sample.image_paths)
        assert sample.prompt in qwen.tokenizer.decode(positive["input_ids"][0])
        assert QWEN_NEGATIVE_PROMPT in qwen.tokenizer.decode(negative["input_ids"][0])


def test_new_meta_keeps_fields_and_input_untouched(demo_meta, extracted):
    output, written, _ = extracted
    assert written == output / "meta_with_features.json"
    source, result = json.loads(demo_meta.read_text()), json.loads(written.read_text())
    assert sorted(result) == sorted(source)
    for key, entry in result.items():
        assert entry.pop("hidden_states_path") == f"hidden_states/{key}.safetensors"
        assert entry == source[key]  # every other field as it was; the input file itself is unchanged
    assert not list(output.rglob(".*.tmp*"))  # no temp files left behind


def test_official_pt_pair_written_from_finished_files_without_a_forward(qwen, demo_meta, extracted, tmp_path):
    shutil.copytree(extracted[0], tmp_path, dirs_exist_ok=True)
    with ForwardRecorder(qwen) as recorder:
        written = extract(qwen, demo_meta, tmp_path, write_official_pt=True)
    assert recorder.calls == []
    for sample in read_meta(written, demo_meta.parent):
        files = SampleFiles.of(tmp_path, sample.sample_id)
        assert (sample.hidden_states_path, sample.hidden_states_path_negative) == (files.positive_pt,
                                                                                  files.negative_pt)
        saved = tensors(files.safetensors)
        for path, key in ((files.positive_pt, "positive"), (files.negative_pt, "negative")):
            tensor = torch.load(path, weights_only=True)  # a bare tensor, as the official files
            assert tensor.dtype == torch.bfloat16 and tensor.ndim == 3 and tensor.shape[0] == 1
            assert torch.equal(tensor, saved[key])
        positive, negative = load_sample_hidden_states(sample, hidden_dim=TINY_HIDDEN)
        assert torch.equal(positive, saved["positive"]) and torch.equal(negative, saved["negative"])


def test_refuses_to_overwrite_the_input(qwen, demo_meta):
    settings = ExtractSettings(output_dir=demo_meta.parent, output_meta=demo_meta, progress=False)
    with pytest.raises(BindWeaveInputError, match="never rewrites its input"):
        run_extract(qwen, demo_meta, None, settings)


# ---- resume -----------------------------------------------------------------------------------


def test_resume_skips_finished_and_redoes_a_changed_prompt(qwen, demo_meta, extracted, tmp_path):
    shutil.copytree(extracted[0], tmp_path, dirs_exist_ok=True)
    files = {s.sample_id: SampleFiles.of(tmp_path, s.sample_id).safetensors for s in read_meta(demo_meta)}
    stamps = {key: path.stat().st_mtime_ns for key, path in files.items()}

    with ForwardRecorder(qwen) as recorder:
        extract(qwen, demo_meta, tmp_path)
    assert recorder.calls == []
    assert {key: path.stat().st_mtime_ns for key, path in files.items()} == stamps

    entries = json.loads(demo_meta.read_text())
    changed = "demo_face_1"
    entries[changed]["prompt"] = "A cartoon boy waves."
    edited = demo_meta.parent / "edited.json"
    edited.write_text(json.dumps(entries))
    with ForwardRecorder(qwen) as recorder:
        extract(qwen, edited, tmp_path)
    assert len(recorder.calls) == 2  # positive + negative of the one changed sample
    assert "A cartoon boy waves." in qwen.tokenizer.decode(recorder.calls[0]["input_ids"][0])
    redone = {key for key, path in files.items() if path.stat().st_mtime_ns != stamps[key]}
    assert redone == {changed}
    assert header(files[changed])["prompt_sha256"] == hashlib.sha256(b"A cartoon boy waves.").hexdigest()


def test_resume_redoes_a_damaged_file(qwen, demo_meta, extracted, tmp_path):
    shutil.copytree(extracted[0], tmp_path, dirs_exist_ok=True)
    damaged = SampleFiles.of(tmp_path, "demo_face_1").safetensors
    damaged.write_bytes(b"truncated")
    with ForwardRecorder(qwen) as recorder:
        extract(qwen, demo_meta, tmp_path)
    assert len(recorder.calls) == 2
    assert set(tensors(damaged)) == {"positive", "negative"}


# ---- real cases, stage 3 loading, demo --------------------------------------------------------


@needs_opens2v
def test_fixture_cases_load_in_stage3_in_both_formats(qwen, tmp_path):
    for write_official_pt in (False, True):  # the second run only adds the .pt pair
        settings = ExtractSettings(output_dir=tmp_path, write_official_pt=write_official_pt, progress=False)
        written = run_extract(qwen, OPENS2V / "test_case.json", OPENS2V, settings)
        samples = read_meta(written, image_root=OPENS2V)
        assert [s.sample_id for s in samples] == ["faceobj_1", "multihuman_14", "singleface_1"]
        for sample in samples:
            files = SampleFiles.of(tmp_path, sample.sample_id)
            assert sample.hidden_states_path == (files.positive_pt if write_official_pt else files.safetensors)
            positive, negative = load_sample_hidden_states(sample, hidden_dim=TINY_HIDDEN)
            info = header(files.safetensors)
            assert positive.shape == (1, int(info["positive_length"]), TINY_HIDDEN)
            assert negative.shape == (1, int(info["negative_length"]), TINY_HIDDEN)
            assert all(image.is_file() for image in sample.image_paths)
    assert json.loads(header(SampleFiles.of(tmp_path, "singleface_1").safetensors)["image_tokens"]) == [396]
    assert json.loads(header(SampleFiles.of(tmp_path, "faceobj_1").safetensors)["image_tokens"]) == [108, 1820, 117]


def test_demo_meta_for_stage3(qwen, tiny_root, extracted, tmp_path):
    shutil.copytree(extracted[0] / "hidden_states", tmp_path / "hidden_states")  # resumed: no forward needed
    qwen_folder = tiny_root / "Qwen2.5-VL-7B-Instruct"
    meta = demo_meta_with_hidden_states(tmp_path, hidden_dim=TINY_HIDDEN, qwen_folder=qwen_folder)
    assert meta == tmp_path / "meta_with_features.json"
    for sample in read_meta(meta):
        assert sample.hidden_states_path == tmp_path / "hidden_states" / f"{sample.sample_id}.safetensors"
        positive, negative = load_sample_hidden_states(sample, hidden_dim=TINY_HIDDEN)
        original = tensors(extracted[0] / "hidden_states" / f"{sample.sample_id}.safetensors")
        assert torch.equal(positive, original["positive"]) and torch.equal(negative, original["negative"])
    with pytest.raises(BindWeaveInputError, match="hidden size 40"):
        demo_meta_with_hidden_states(tmp_path, hidden_dim=32, qwen_folder=qwen_folder)


# ---- command line -----------------------------------------------------------------------------


def compose_extract(overrides):
    return compose_config("extract", list(overrides))


def test_command_runs_the_demo_by_default(qwen, extracted, tiny_root, tmp_path):
    # The demo cases are the same bytes wherever they are drawn, so the copied files are reused.
    shutil.copytree(extracted[0], tmp_path / "out")
    cfg = compose_extract([f"output_dir={tmp_path / 'out'}", f"data.demo_dir={tmp_path / 'demo'}",
                           f"qwen.tiny_root={tiny_root}", "progress=false"])
    assert cfg.data.meta_path is None and cfg.write_official_pt is False
    assert run_extract_command(cfg) == 0
    written = json.loads((tmp_path / "out" / "meta_with_features.json").read_text())
    assert written == json.loads(extracted[1].read_text())


def test_command_reports_bad_input_with_exit_code_2(tiny_root, tmp_path, capsys):
    cfg = compose_extract([f"output_dir={tmp_path}", f"data.meta_path={tmp_path / 'missing.json'}",
                           f"qwen.tiny_root={tiny_root}"])
    assert run_extract_command(cfg) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    assert not (tmp_path / "meta_with_features.json").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_same_files_as_one(tiny_root, demo_meta, extracted, tmp_path):
    one, two = extracted[0], tmp_path
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "launch" / "extract.py"), f"output_dir={two}", f"data.meta_path={demo_meta}",
               f"qwen.tiny_root={tiny_root}", "qwen.device=cpu", "progress=false"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: 2 extracted" in result.stderr and "rank 1: 1 extracted" in result.stderr
    assert (two / "meta_with_features.json").read_text() == (one / "meta_with_features.json").read_text()
    for sample in read_meta(demo_meta):
        single, strided = (SampleFiles.of(folder, sample.sample_id).safetensors for folder in (one, two))
        assert header(strided) == header(single)
        assert all(torch.equal(a, b) for a, b in zip(tensors(single).values(), tensors(strided).values()))


def meta_with_missing_image(demo_meta, folder, sample_id="demo_dog_teapot_2"):
    """The demo cases, one of them naming a reference image that does not exist."""
    entries = json.loads(demo_meta.read_text())
    entries[sample_id]["img_paths"] = ["Images/missing.png"]
    path = folder / "meta_missing.json"
    path.write_text(json.dumps(entries))
    return path


def test_command_on_error_skip_finishes_the_others(demo_meta, extracted, tiny_root, tmp_path, capsys):
    shutil.copytree(extracted[0], tmp_path / "out")  # the good samples are resumed: no forward needed
    meta = meta_with_missing_image(demo_meta, tmp_path)
    overrides = [f"output_dir={tmp_path / 'out'}", f"data.image_root={demo_meta.parent}", f"qwen.tiny_root={tiny_root}",
                 "progress=false", "on_error=skip"]
    assert run_extract_command(compose_extract([f"data.meta_path={meta}", *overrides])) == 1
    failed = json.loads((tmp_path / "out" / "failed.json").read_text())
    assert list(failed) == ["demo_dog_teapot_2"] and "missing.png does not exist" in failed["demo_dog_teapot_2"]
    # Left out of the new meta JSON: every entry there has its hidden states, ready for stage 3.
    written = json.loads((tmp_path / "out" / "meta_with_features.json").read_text())
    assert sorted(written) == ["demo_face_1", "demo_face_dog_house_3"]
    assert list((tmp_path / "out" / ".hydra").rglob("config.yaml"))
    assert "error:" not in capsys.readouterr().err

    # Fixed: the re-run completes the meta JSON and removes the stale failed.json.
    assert run_extract_command(compose_extract([f"data.meta_path={demo_meta}", *overrides])) == 0
    assert len(json.loads((tmp_path / "out" / "meta_with_features.json").read_text())) == 3
    assert not (tmp_path / "out" / "failed.json").exists()


def test_command_on_error_fail_stops_at_the_first_bad_sample(demo_meta, tiny_root, tmp_path, capsys):
    meta = meta_with_missing_image(demo_meta, tmp_path)  # the first sample (sorted ids): no forward runs
    cfg = compose_extract([f"output_dir={tmp_path / 'out'}", f"data.meta_path={meta}", f"data.image_root={demo_meta.parent}",
                           f"qwen.tiny_root={tiny_root}", "progress=false"])
    assert run_extract_command(cfg) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sample 'demo_dog_teapot_2'" in errors[0] and "missing.png" in errors[0]
    assert not (tmp_path / "out" / "meta_with_features.json").exists()
    assert not (tmp_path / "out" / "failed.json").exists()


def test_launch_bad_output_dir_is_one_error_line(tiny_root, tmp_path):
    (tmp_path / "a_file").write_text("")
    command = [sys.executable, str(REPO / "launch" / "extract.py"), f"output_dir={tmp_path / 'a_file' / 'out'}",
               f"data.demo_dir={tmp_path / 'demo'}", f"qwen.tiny_root={tiny_root}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Cannot create the output folder" in errors[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # Hydra wrote nothing (no .hydra, no outputs)


def test_launch_multirun_gives_each_job_its_folder(demo_meta, tiny_root, tmp_path):
    command = [sys.executable, str(REPO / "launch" / "extract.py"), "-m", f"data.meta_path={demo_meta}",
               f"qwen.tiny_root={tiny_root}", "qwen.device=cpu", "progress=false", "write_official_pt=false,true"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "BINDWEAVE_RUN_STAMP": "sweep"})
    assert result.returncode == 0, result.stderr[-3000:]
    for job, official in (("0", False), ("1", True)):
        folder = tmp_path / "multirun" / "sweep" / job
        written = json.loads((folder / "meta_with_features.json").read_text())
        assert len(written) == 3
        assert all(entry["hidden_states_path"].endswith(".pt" if official else ".safetensors")
                   for entry in written.values())
        assert list((folder / ".hydra").rglob("config.yaml"))
    output = result.stdout + result.stderr
    assert "sweep summary" in output and output.count("3 done, 0 skipped, 0 failed") == 2


@pytest.mark.slow
def test_torchrun_on_error_skip_gathers_every_ranks_failures(tiny_root, demo_meta, extracted, tmp_path):
    shutil.copytree(extracted[0], tmp_path / "out")  # resumed: no forward needed
    meta = meta_with_missing_image(demo_meta, tmp_path, "demo_face_1")  # rank 1's only sample of three
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "launch" / "extract.py"), f"output_dir={tmp_path / 'out'}", f"data.meta_path={meta}",
               f"data.image_root={demo_meta.parent}", f"qwen.tiny_root={tiny_root}", "qwen.device=cpu",
               "progress=false", "on_error=skip"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "rank 1: 0 extracted, 0 already there, 1 failed" in result.stderr
    assert list(json.loads((tmp_path / "out" / "failed.json").read_text())) == ["demo_face_1"]
    written = json.loads((tmp_path / "out" / "meta_with_features.json").read_text())
    assert sorted(written) == ["demo_dog_teapot_2", "demo_face_dog_house_3"]
