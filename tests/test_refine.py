"""Stage 1: prompt refinement (bindweave/stages/refine.py), SPEC §8, against a real loopback HTTP server."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from bindweave.io.inputs import load_reference_image, read_meta
from bindweave.testing.demo_cases import write_demo_cases
from bindweave.app.config import compose_config
from bindweave.errors import BindWeaveInputError
from bindweave.encoders.qwen import build_inputs, load_qwen, prescale_references
from bindweave.settings.qwen import QwenSettings
from bindweave.stages.refine import (EndpointRefiner, LocalQwenRefiner, RefinerUnavailable, partial_meta_path,
                                     refine_instruction, refine_samples)
from bindweave.settings.refine import EndpointSettings, LocalSettings
from bindweave.app.refine import run_refine_command

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "BINDWEAVE_TEST_API_KEY"


class ChatServer:
    """A chat-completions server on 127.0.0.1 that plays scripted replies and records requests.

    `replies` holds (status, body) pairs, used in order; when one is left it is repeated.
    """

    def __init__(self):
        self.replies = []
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "json": body})
                status, reply = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def answer(text, finish_reason="stop"):
    return 200, {"id": "x", "object": "chat.completion", "model": "test-vlm",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": finish_reason}]}


def error(status, message):
    return status, {"error": {"message": message, "type": "error"}}


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.close()


@pytest.fixture(scope="session")
def demo_meta(tmp_path_factory):
    return write_demo_cases(tmp_path_factory.mktemp("demo"))


def endpoint(server, **options):
    settings = dict(base_url=server.base_url, model="test-vlm", api_key_env=KEY_ENV, retry_base_s=0.01,
                    max_retries=3, max_retry_s=10)
    return EndpointRefiner(EndpointSettings(**{**settings, **options}))


def decode_data_url(url):
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


# ---- endpoint ---------------------------------------------------------------------------------


def test_endpoint_request_format_and_retry_after_500(server, demo_meta, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    server.replies = [error(500, "overloaded"), answer("  A boy waves in a sunny park.  ")]
    samples = [s for s in read_meta(demo_meta) if s.sample_id == "demo_face_dog_house_3"]
    output = tmp_path / "refined.json"
    summary = refine_samples(endpoint(server), samples, output, progress=False)

    assert summary == {"done": ["demo_face_dog_house_3"], "skipped": [], "failed": {}}
    assert len(server.requests) == 2  # the 500, then the retry
    request = server.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["json"]["model"] == "test-vlm"
    [message] = request["json"]["messages"]
    text, *images = message["content"]
    assert text["type"] == "text" and samples[0].prompt in text["text"]
    assert "split screen" in text["text"] and "English" in text["text"]
    # The references as JPEG data URLs, in img_paths order (face 480x600, dog 800x560, house 1024x576).
    decoded = [decode_data_url(part["image_url"]["url"]) for part in images]
    assert [image.format for image in decoded] == ["JPEG"] * 3
    assert [image.size for image in decoded] == [load_reference_image(p).size for p in samples[0].image_paths]

    entry = json.loads(output.read_text())["demo_face_dog_house_3"]
    assert entry["prompt"] == "A boy waves in a sunny park."
    assert entry["prompt_original"] == samples[0].prompt
    assert entry["class_label"] == ["Man", "Dog", "House"]


def test_endpoint_401_fails_clearly_without_retrying(server, demo_meta, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    server.replies = [error(401, "Incorrect API key provided")]
    output = tmp_path / "refined.json"
    with pytest.raises(BindWeaveInputError) as caught:
        refine_samples(endpoint(server), read_meta(demo_meta), output, progress=False)
    message = str(caught.value)
    assert server.base_url in message and KEY_ENV in message and "401" in message
    assert len(server.requests) == 1
    assert not output.exists()


def test_endpoint_other_4xx_is_not_retried(server, demo_meta, tmp_path):
    server.replies = [error(404, "model not found")]
    with pytest.raises(BindWeaveInputError, match="refiner.model=test-vlm"):
        refine_samples(endpoint(server), read_meta(demo_meta)[:1], tmp_path / "r.json", progress=False)
    assert len(server.requests) == 1


def test_endpoint_retries_are_bounded(server, demo_meta, tmp_path):
    server.replies = [error(503, "busy")]
    with pytest.raises(BindWeaveInputError, match="failed 4 times"):
        refine_samples(endpoint(server, max_retries=3), read_meta(demo_meta)[:1], tmp_path / "r.json",
                       progress=False)
    assert len(server.requests) == 4


def test_connection_errors_are_retried_then_reported(demo_meta, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refiner = EndpointRefiner(EndpointSettings(base_url=f"http://127.0.0.1:{port}/v1", model="m",
                                               max_retries=2, retry_base_s=0.01))
    with pytest.raises(BindWeaveInputError, match="failed 3 times .*ConnectionError"):
        refine_samples(refiner, read_meta(demo_meta)[:1], tmp_path / "r.json", progress=False)


@pytest.mark.parametrize("reply, match", [
    (answer("A boy waves and", finish_reason="length"), "cut the answer off at refiner.max_tokens"),
    (answer("   "), "empty prompt"),
    (answer(None), "empty prompt"),
    ((200, {"unexpected": True}), "without choices"),
])
def test_truncated_or_empty_answers_are_refused(server, demo_meta, tmp_path, reply, match):
    server.replies = [reply]
    output = tmp_path / "refined.json"
    with pytest.raises(BindWeaveInputError, match=match):
        refine_samples(endpoint(server), read_meta(demo_meta), output, progress=False)
    assert not output.exists()


def test_resume_asks_only_for_new_or_changed_prompts(server, demo_meta, tmp_path):
    server.replies = [answer("A refined scene.")]
    output = tmp_path / "refined.json"
    samples = read_meta(demo_meta)
    refine_samples(endpoint(server), samples, output, progress=False)
    assert len(server.requests) == 3

    summary = refine_samples(endpoint(server), samples, output, progress=False)
    assert len(server.requests) == 3 and summary["done"] == []

    entries = json.loads(demo_meta.read_text())
    entries["demo_face_1"]["prompt"] = "A boy jumps."
    entries["demo_dog_teapot_2"]["hidden_states_path"] = "old/states.safetensors"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(entries))
    summary = refine_samples(endpoint(server), read_meta(edited, demo_meta.parent), output, progress=False)
    assert summary["done"] == ["demo_face_1"] and len(server.requests) == 4
    assert "A boy jumps." in server.requests[-1]["json"]["messages"][0]["content"][0]["text"]
    result = json.loads(output.read_text())
    assert result["demo_face_1"]["prompt_original"] == "A boy jumps."
    # Hidden states of the old prompt do not describe the refined one: they are dropped.
    assert "hidden_states_path" not in result["demo_dog_teapot_2"]

    # A meta file that is itself refined output is passed through, not refined twice.
    summary = refine_samples(endpoint(server), read_meta(output, demo_meta.parent), tmp_path / "again.json",
                             progress=False)
    assert summary["done"] == [] and len(server.requests) == 4


def test_interrupted_run_keeps_its_progress_apart_from_the_final_name(server, demo_meta, tmp_path):
    server.replies = [answer("First refined."), error(400, "bad image")]
    output = tmp_path / "refined.json"
    samples = read_meta(demo_meta)
    with pytest.raises(BindWeaveInputError, match=f"sample '{samples[1].sample_id}': .*400"):
        refine_samples(endpoint(server), samples, output, progress=False)
    # No complete-looking file mixing refined and unrefined prompts: the progress is in the partial one.
    assert not output.exists()
    partial = partial_meta_path(output)
    assert partial == tmp_path / "refined.partial.json"
    entries = json.loads(partial.read_text())
    first, *others = sorted(entries)
    assert entries[first]["prompt"] == "First refined."
    assert all("prompt_original" not in entries[key] for key in others)

    # The re-run asks only for the two others, then writes the final name whole and drops the partial file.
    server.replies = [answer("Refined again.")]
    asked = len(server.requests)
    summary = refine_samples(endpoint(server), samples, output, progress=False)
    assert summary == {"done": [s.sample_id for s in samples[1:]], "skipped": [first], "failed": {}}
    assert len(server.requests) == asked + 2
    entries = json.loads(output.read_text())
    assert entries[first]["prompt"] == "First refined."
    assert all(entries[key]["prompt"] == "Refined again." for key in others)
    assert not partial.exists()


def test_rerun_with_a_changed_prompt_moves_the_old_result_to_the_partial_file(server, demo_meta, tmp_path):
    server.replies = [answer("A refined scene.")]
    output = tmp_path / "refined.json"
    refine_samples(endpoint(server), read_meta(demo_meta), output, progress=False)
    entries = json.loads(demo_meta.read_text())
    entries["demo_face_1"]["prompt"] = "A boy jumps."
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(entries))
    server.replies = [answer("   ")]  # the changed sample fails: the old complete file no longer matches
    with pytest.raises(BindWeaveInputError, match="sample 'demo_face_1': the refiner answered with an empty prompt"):
        refine_samples(endpoint(server), read_meta(edited, demo_meta.parent), output, progress=False)
    assert not output.exists()
    kept = json.loads(partial_meta_path(output).read_text())
    assert kept["demo_face_1"]["prompt"] == "A boy jumps." and "prompt_original" not in kept["demo_face_1"]
    assert all(kept[key]["prompt"] == "A refined scene." for key in kept if key != "demo_face_1")


def test_skip_leaves_failed_samples_out_and_unavailable_refiner_still_stops(server, demo_meta, tmp_path):
    server.replies = [error(400, "bad image"), answer("A refined scene.")]
    output = tmp_path / "refined.json"
    samples = read_meta(demo_meta)
    summary = refine_samples(endpoint(server), samples, output, progress=False, on_error="skip")
    bad = samples[0].sample_id
    assert list(summary["failed"]) == [bad] and "400" in summary["failed"][bad]
    entries = json.loads(output.read_text())
    assert sorted(entries) == [s.sample_id for s in samples[1:]]  # every entry is a refined prompt
    assert all(entry["prompt"] == "A refined scene." for entry in entries.values())
    assert not partial_meta_path(output).exists()

    # A refused key would fail every sample alike: it ends the run even with on_error=skip.
    server.replies = [error(401, "Incorrect API key provided")]
    with pytest.raises(RefinerUnavailable, match="401"):
        refine_samples(endpoint(server), samples, output, progress=False, on_error="skip")
    assert not output.exists() and partial_meta_path(output).exists()


# ---- local Qwen2.5-VL -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_root(tiny_models):
    return tiny_models.qwen.parent


def test_local_qwen_refines_and_refuses_cut_off_answers(tiny_root, demo_meta, tmp_path):
    qwen = load_qwen(QwenSettings(tiny_root=str(tiny_root), device="cpu"))
    samples = read_meta(demo_meta)[:1]
    # The tiny random model never emits its end-of-turn token: every answer is cut off.
    with pytest.raises(BindWeaveInputError, match="cut off at refiner.max_new_tokens=3"):
        refine_samples(LocalQwenRefiner(qwen, LocalSettings(max_new_tokens=3)), samples, tmp_path / "r.json",
                       progress=False)
    demo = LocalQwenRefiner(qwen, LocalSettings(max_new_tokens=3, allow_truncated=True))
    refine_samples(demo, samples, tmp_path / "r.json", progress=False)
    entry = json.loads((tmp_path / "r.json").read_text())[samples[0].sample_id]
    assert entry["prompt"].strip() and entry["prompt_original"] == samples[0].prompt


def test_local_answer_ending_within_the_limit_is_kept(tiny_root, demo_meta):
    qwen = load_qwen(QwenSettings(tiny_root=str(tiny_root), device="cpu"))  # its config is changed below
    images = [load_reference_image(p) for p in read_meta(demo_meta)[0].image_paths]
    inputs = build_inputs(qwen, refine_instruction("a boy"), prescale_references(images))
    first_token = int(qwen.model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1])
    # Make the greedy first token the end-of-turn token: the answer then ends within the limit.
    qwen.model.generation_config.eos_token_id = first_token
    answer_text = LocalQwenRefiner(qwen, LocalSettings(max_new_tokens=3)).refine("a boy", images)
    assert answer_text == qwen.tokenizer.decode([first_token], skip_special_tokens=True)


# ---- command line -----------------------------------------------------------------------------


def compose_refine(overrides):
    return compose_config("refine", list(overrides))


def test_command_with_endpoint(server, demo_meta, tmp_path):
    server.replies = [answer("A refined scene.")]
    cfg = compose_refine(["refiner=openai", f"refiner.base_url={server.base_url}", "refiner.model=test-vlm",
                          f"data.meta_path={demo_meta}", f"output_dir={tmp_path}", "progress=false"])
    assert run_refine_command(cfg) == 0
    assert all(entry["prompt"] == "A refined scene." for entry in json.loads(
        (tmp_path / "meta_refined.json").read_text()).values())


def test_command_demo_defaults_and_bad_input(tiny_root, tmp_path, capsys):
    cfg = compose_refine([f"output_dir={tmp_path}", f"data.demo_dir={tmp_path / 'demo'}",
                          f"qwen.tiny_root={tiny_root}", "refiner.max_new_tokens=2", "progress=false"])
    assert OmegaConf.get_type(cfg.refiner) is LocalSettings and cfg.refiner.allow_truncated
    assert run_refine_command(cfg) == 0
    refined = json.loads((tmp_path / "meta_refined.json").read_text())
    assert len(refined) == 3 and all(entry["prompt"].strip() for entry in refined.values())

    cfg = compose_refine([f"output_dir={tmp_path}", f"data.meta_path={tmp_path / 'meta_refined.json'}",
                          f"output_meta={tmp_path / 'meta_refined.json'}", "refiner=openai", "refiner.model=m"])
    assert run_refine_command(cfg) == 2
    assert "never rewrites its input" in capsys.readouterr().err


def test_command_needs_the_endpoint_model_name(tmp_path, capsys):
    cfg = compose_refine(["refiner=openai", f"output_dir={tmp_path}", f"data.demo_dir={tmp_path / 'demo'}"])
    assert run_refine_command(cfg) == 2
    assert "refiner.model is not set" in capsys.readouterr().err


def meta_with_missing_image(demo_meta, tmp_path, sample_id="demo_face_dog_house_3"):
    """The demo cases, one of them naming a reference image that does not exist."""
    entries = json.loads(demo_meta.read_text())
    entries[sample_id]["img_paths"] = ["Images/missing.png"]
    path = tmp_path / "meta_missing.json"
    path.write_text(json.dumps(entries))
    return path


def endpoint_overrides(server, meta, image_root, output_dir, *more):
    return ["refiner=openai", f"refiner.base_url={server.base_url}", "refiner.model=test-vlm",
            "refiner.retry_base_s=0.01", f"data.meta_path={meta}", f"data.image_root={image_root}",
            f"output_dir={output_dir}", "progress=false", *more]


def test_command_on_error_skip_finishes_the_others(server, demo_meta, tmp_path, capsys):
    meta = meta_with_missing_image(demo_meta, tmp_path)
    server.replies = [answer("A refined scene.")]
    output_dir = tmp_path / "out"
    cfg = compose_refine(endpoint_overrides(server, meta, demo_meta.parent, output_dir, "on_error=skip"))
    assert run_refine_command(cfg) == 1
    assert len(server.requests) == 2  # the bad sample is never sent
    failed = json.loads((output_dir / "failed.json").read_text())
    assert list(failed) == ["demo_face_dog_house_3"] and "missing.png does not exist" in failed["demo_face_dog_house_3"]
    refined = json.loads((output_dir / "meta_refined.json").read_text())
    assert sorted(refined) == ["demo_dog_teapot_2", "demo_face_1"]
    assert not (output_dir / "meta_refined.partial.json").exists()
    assert list((output_dir / ".hydra").rglob("config.yaml"))  # the resolved config, saved by the command
    assert "error:" not in capsys.readouterr().err

    # Fixed: the re-run asks for that one sample only, completes the file and removes failed.json.
    cfg = compose_refine(endpoint_overrides(server, demo_meta, demo_meta.parent, output_dir, "on_error=skip"))
    assert run_refine_command(cfg) == 0
    assert len(server.requests) == 3
    assert len(json.loads((output_dir / "meta_refined.json").read_text())) == 3
    assert not (output_dir / "failed.json").exists()


def test_command_on_error_fail_stops_at_the_first_bad_sample(server, demo_meta, tmp_path, capsys):
    meta = meta_with_missing_image(demo_meta, tmp_path)
    server.replies = [answer("A refined scene.")]
    output_dir = tmp_path / "out"
    (output_dir).mkdir()
    (output_dir / "failed.json").write_text("{}")  # an older run's
    assert run_refine_command(compose_refine(endpoint_overrides(server, meta, demo_meta.parent, output_dir))) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sample 'demo_face_dog_house_3'" in errors[0] and "missing.png" in errors[0]
    assert len(server.requests) == 2  # the two samples before it (sorted ids)
    assert not (output_dir / "meta_refined.json").exists() and not (output_dir / "failed.json").exists()
    assert len(json.loads((output_dir / "meta_refined.partial.json").read_text())) == 3


def test_command_rejects_an_unknown_on_error(tmp_path, capsys):
    cfg = compose_refine(["refiner=openai", "refiner.model=m", f"output_dir={tmp_path}", "on_error=ignore"])
    assert run_refine_command(cfg) == 2
    assert "on_error=ignore: use on_error=fail or on_error=skip" in capsys.readouterr().err


def launch_refine(cwd, *overrides, env=None):
    return subprocess.run([sys.executable, str(REPO / "launch" / "refine.py"), *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=180, env={**os.environ, **(env or {})})


def test_launch_bad_output_dir_is_one_error_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = launch_refine(tmp_path, "refiner=openai", "refiner.model=m", f"output_dir={tmp_path / 'a_file' / 'out'}",
                           f"data.demo_dir={tmp_path / 'demo'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Cannot create the output folder" in errors[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # Hydra wrote nothing (no .hydra, no outputs)


def test_launch_multirun_gives_each_job_its_folder(server, demo_meta, tmp_path):
    server.replies = [answer("A refined scene.")]
    result = launch_refine(tmp_path, "-m", "refiner=openai", f"refiner.base_url={server.base_url}",
                           "refiner.model=vlm-a,vlm-b", f"data.meta_path={demo_meta}", "progress=false",
                           env={"BINDWEAVE_RUN_STAMP": "sweep"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(request["json"]["model"] for request in server.requests) == ["vlm-a"] * 3 + ["vlm-b"] * 3
    for job in ("0", "1"):
        folder = tmp_path / "multirun" / "sweep" / job
        assert len(json.loads((folder / "meta_refined.json").read_text())) == 3
        assert f"refiner.model=vlm-{'ab'[int(job)]}" in "".join(p.read_text() for p in (folder / ".hydra").rglob(
            "overrides.yaml"))
    output = result.stdout + result.stderr
    assert "sweep summary" in output and output.count("3 done, 0 skipped, 0 failed") == 2
