"""Stage 1 (optional): rewrite each sample's prompt into one coherent scene (SPEC §8).

The rewriting model sees `REFINE_INSTRUCTION` (with the user's prompt) and then the sample's
reference images in `img_paths` order. Two backends, one interface (`refine(prompt, images)`):

- `EndpointRefiner`: any OpenAI-compatible chat-completions server; images as JPEG (quality 90)
  data URLs, as the reference sends them. Retries 429/5xx/connection errors with exponential
  backoff (bounded in count and time); a 401/403 or other 4xx is a clear error.
- `LocalQwenRefiner`: the local Qwen2.5-VL through the shared loader and message builder
  (`bindweave.encoders.qwen`, stage-2 pre-scale included), greedy `generate`.

An empty answer, or one cut off by the token limit, is refused: it would silently become the
video's prompt. The output is a NEW meta JSON where each refined sample keeps the user's text as
`prompt_original`. See :func:`refine_samples` for how progress survives a crash (the final name
appears only for a finished run) and what ``on_error=skip`` writes.

Failures come in two kinds. A sample's own (an unreadable reference image, a request the server
rejects as bad (400, 413, 422), an empty or cut-off answer) ends the run (on_error=fail, exit 2)
or is reported and skipped (on_error=skip, exit 1). One that every sample would hit alike (a
refused API key, a wrong URL or model, a server that stays down through the retries, an answer
that is no chat completion) is a :class:`RefinerUnavailable`: it ends the run with exit 2 under
either setting, instead of failing every remaining sample one request at a time.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
from pathlib import Path

import requests
import torch
from PIL import Image
from tqdm import tqdm

from bindweave.io.inputs import Sample, load_reference_image
from bindweave.errors import BindWeaveInputError
from bindweave.io.outputs import write_json
from bindweave.encoders.qwen import QwenVL, build_inputs, prescale_references
from bindweave.settings.refine import EndpointSettings, LocalSettings

log = logging.getLogger("bindweave")

# SPEC §8: one coherent scene in one English paragraph, subjects' looks from the images, no split
# screen or duplicates, natural integration, clear motion; the prompt only.
REFINE_INSTRUCTION = """\
You write prompts for a video generation model. Rewrite the user's idea below into a prompt for \
ONE single, continuous and coherent scene, using the reference images that follow (in order).

Rules:
1. One scene only: no split screen, no side-by-side panels, no collage, and no duplicated or \
twin subjects. Every subject appears exactly once.
2. Describe every subject with the visible features from its reference image (clothing, hair, \
face, colours, shape, material) so that it stays recognisable.
3. Place the subjects naturally in the environment, with realistic lighting, shadows and depth, \
so that nothing looks pasted in.
4. Describe clear, significant motion with precise verbs. Camera movement (a slow pan, a gentle \
zoom, a tracking shot) is welcome.

User's idea: "{prompt}"

Answer with the rewritten prompt only: one descriptive paragraph in English, with no title, \
preamble, list or quotation marks."""

JPEG_QUALITY = 90
REFINED_META_NAME = "meta_refined.json"
# Hidden states made from the old prompt no longer match a refined one: stage 2 must run again.
STALE_FIELDS = ("hidden_states_path", "hidden_states_path_negative")


class RefinerUnavailable(BindWeaveInputError):
    """The refiner cannot serve any sample (bad key, wrong URL or model, server down, not a chat
    API): the run stops even with on_error=skip, since every other sample would fail alike."""


def refine_instruction(prompt: str) -> str:
    return REFINE_INSTRUCTION.format(prompt=prompt)


def jpeg_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- OpenAI-compatible endpoint -----------------------------------------------------------------


class EndpointRefiner:
    """Chat-completions client: one request per sample, text first, then one image_url per image."""

    def __init__(self, settings: EndpointSettings):
        self.settings = settings
        self.headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(settings.api_key_env)
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        else:  # local servers (vLLM, llama.cpp) often need none
            log.warning("refiner: environment variable %s is not set; calling %s without an API key",
                        settings.api_key_env, settings.url)

    def refine(self, prompt: str, images: list[Image.Image]) -> str:
        content = [{"type": "text", "text": refine_instruction(prompt)}]
        content += [{"type": "image_url", "image_url": {"url": jpeg_data_url(image)}} for image in images]
        payload = {"model": self.settings.model, "messages": [{"role": "user", "content": content}],
                   "max_tokens": self.settings.max_tokens}
        return self._answer(self._post_with_retries(payload))

    def _post_with_retries(self, payload: dict) -> dict:
        settings = self.settings
        deadline = time.monotonic() + settings.max_retry_s
        for attempt in range(settings.max_retries + 1):
            try:
                response = requests.post(settings.url, json=payload, headers=self.headers,
                                         timeout=settings.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as error:
                failure = f"{type(error).__name__}: {error}"
            except requests.RequestException as error:  # a malformed URL: retrying cannot help
                raise RefinerUnavailable(f"refiner.base_url={settings.base_url!r} cannot be called ({error}): "
                                          f"give a full URL such as http://localhost:8000/v1") from None
            else:
                if response.status_code == 200:
                    return self._json(response)
                failure = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code in (401, 403):
                    raise RefinerUnavailable(
                        f"{settings.url} refused the API key ({failure}): put a valid key in the environment "
                        f"variable {settings.api_key_env} (refiner.api_key_env names it).")
                if response.status_code != 429 and response.status_code < 500:
                    # 404/405: no such model or endpoint, for every sample alike; others (400, 413,
                    # 422): this sample's request (its images, its prompt).
                    error_type = RefinerUnavailable if response.status_code in (404, 405) else BindWeaveInputError
                    raise error_type(
                        f"{settings.url} rejected the request ({failure}): check refiner.model="
                        f"{settings.model} and refiner.base_url (it ends before /chat/completions).")
            delay = settings.retry_base_s * 2 ** attempt
            if attempt == settings.max_retries or time.monotonic() + delay > deadline:
                break
            log.warning("refiner: %s (attempt %d of %d); retrying in %.1f s", failure, attempt + 1,
                        settings.max_retries + 1, delay)
            time.sleep(delay)
        raise RefinerUnavailable(
            f"{settings.url} failed {attempt + 1} times (last: {failure}): check that the server is up, or "
            f"raise refiner.max_retries / refiner.max_retry_s. Re-running resumes after the refined samples.")

    def _json(self, response: requests.Response) -> dict:
        try:
            return response.json()
        except ValueError:
            raise RefinerUnavailable(f"{self.settings.url} answered HTTP 200 with no JSON "
                                      f"({response.text[:200]!r}): is base_url an OpenAI-compatible API?") from None

    def _answer(self, body: dict) -> str:
        try:
            choice = body["choices"][0]
            text, finish_reason = choice["message"]["content"], choice.get("finish_reason")
        except (KeyError, IndexError, TypeError):
            raise RefinerUnavailable(f"{self.settings.url} answered without choices[0].message.content "
                                      f"({json.dumps(body)[:300]}): is it a chat-completions API?") from None
        if finish_reason == "length":
            raise BindWeaveInputError(f"{self.settings.url} cut the answer off at refiner.max_tokens="
                                      f"{self.settings.max_tokens}: raise it.")
        return text or ""


# ---- local Qwen2.5-VL ---------------------------------------------------------------------------


class LocalQwenRefiner:
    """Greedy generation with the local Qwen2.5-VL from the stage-2 message (text, then images)."""

    def __init__(self, qwen: QwenVL, settings: LocalSettings):
        self.qwen = qwen
        self.settings = settings

    @torch.inference_mode()
    def refine(self, prompt: str, images: list[Image.Image]) -> str:
        inputs = build_inputs(self.qwen, refine_instruction(prompt), prescale_references(images))
        output = self.qwen.model.generate(**inputs, max_new_tokens=self.settings.max_new_tokens, do_sample=False)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        stop_ids = self.qwen.model.generation_config.eos_token_id
        stop_ids = set(stop_ids if isinstance(stop_ids, list) else [stop_ids])
        if len(new_tokens) >= self.settings.max_new_tokens and int(new_tokens[-1]) not in stop_ids:
            if not self.settings.allow_truncated:
                raise BindWeaveInputError(f"the local Qwen2.5-VL answer was cut off at refiner.max_new_tokens="
                                          f"{self.settings.max_new_tokens}: raise it.")
            log.warning("refiner: keeping an answer cut off at %d tokens (refiner.allow_truncated=true)",
                        self.settings.max_new_tokens)
        return self.qwen.tokenizer.decode(new_tokens, skip_special_tokens=True)


# ---- the stage ----------------------------------------------------------------------------------


def partial_meta_path(output_meta: Path) -> Path:
    """Where a run keeps its progress until every sample is refined: ``meta_refined.partial.json``
    beside ``meta_refined.json``."""
    return output_meta.with_name(f"{output_meta.stem}.partial{output_meta.suffix or '.json'}")


def refine_samples(refiner, samples: list[Sample], output_meta: Path, progress: bool = True,
                   on_error: str = "fail", failed: dict[str, str] | None = None) -> dict:
    """Refine every sample not refined yet; returns ``{"done": [ids], "skipped": [ids], "failed":
    {id: reason}}`` (``failed`` starts from the given one: samples already known to be bad).

    Progress survives a crash without a complete-looking file: after each sample every entry (the
    refined ones refined, the others as the input has them) is written atomically to
    :func:`partial_meta_path`, and ``output_meta`` itself is written only when the run ends, with
    every entry refined; the partial file is then removed. A run that has anything to refine first
    moves what it carries over into the partial file and removes an older ``output_meta``, so after a
    failure or a crash that name never holds an unfinished or outdated mix. A re-run resumes from
    the partial file (else from ``output_meta``): a sample whose ``prompt_original`` equals its
    current prompt is not asked again.

    ``on_error="fail"``: the first sample that fails raises BindWeaveInputError naming it (progress
    stays in the partial file). ``on_error="skip"``: it is logged and recorded in ``failed``, the
    others go on, and the failed samples are LEFT OUT of ``output_meta``: every entry of that file
    is then a refined prompt. Keeping them with their original prompt (marked) would let stages 2
    and 3 turn them into videos of the unrefined text without anyone noticing, and a mixed file is
    what this stage must never hand on; left out, they are named in ``<output_dir>/failed.json``
    and by the exit code 1, and a re-run (after fixing them) refines just those and writes the
    file whole. When no sample is refined at all, no ``output_meta`` is written (a meta file with
    no samples is not valid input). A :class:`RefinerUnavailable` always raises.
    """
    partial = partial_meta_path(output_meta)
    previous = _read_previous(partial) or _read_previous(output_meta)
    entries = {sample.sample_id: dict(sample.fields) for sample in samples}
    summary = {"done": [], "skipped": [], "failed": dict(failed or {})}
    pending, carried = [], False
    for sample in samples:
        earlier = previous.get(sample.sample_id)
        if "prompt_original" in sample.fields:  # the input is itself a refined meta file
            summary["skipped"].append(sample.sample_id)
        elif isinstance(earlier, dict) and earlier.get("prompt_original") == sample.prompt and earlier.get("prompt"):
            entries[sample.sample_id] = _refined_entry(sample, earlier["prompt"])
            summary["skipped"].append(sample.sample_id)
            carried = True
        else:
            pending.append(sample)
    if pending:
        if carried:  # the earlier progress, before the older complete file goes
            write_json(partial, entries)
        output_meta.unlink(missing_ok=True)
    for sample in tqdm(pending, desc="refine", disable=not progress):
        started = time.perf_counter()
        try:
            refined = _refine_sample(refiner, sample)
        except RefinerUnavailable:
            raise
        except BindWeaveInputError as error:
            if on_error != "skip":
                raise BindWeaveInputError(f"sample {sample.sample_id!r}: {error}") from None
            log.error("%s: %s (skipped; on_error=skip)", sample.sample_id, error)
            summary["failed"][sample.sample_id] = str(error)
            continue
        entries[sample.sample_id] = _refined_entry(sample, refined)
        write_json(partial, entries)
        log.info("%s (%.1f s): %r -> %r", sample.sample_id, time.perf_counter() - started, sample.prompt, refined)
        summary["done"].append(sample.sample_id)
    refined_entries = {key: entry for key, entry in entries.items() if key not in summary["failed"]}
    if refined_entries:
        write_json(output_meta, refined_entries)
    partial.unlink(missing_ok=True)
    return summary


def _refine_sample(refiner, sample: Sample) -> str:
    images = [load_reference_image(path) for path in sample.image_paths]
    refined = refiner.refine(sample.prompt, images).strip()
    if not refined:
        raise BindWeaveInputError("the refiner answered with an empty prompt, which is not written. Check the "
                                  "refiner model, or skip stage 1.")
    return refined


def _refined_entry(sample: Sample, refined: str) -> dict:
    """The sample's fields with the refined prompt, the user's text kept, and no stale hidden states."""
    entry = {key: value for key, value in sample.fields.items() if key not in STALE_FIELDS}
    return {**entry, "prompt": refined, "prompt_original": sample.prompt}


def _read_previous(output_meta: Path) -> dict:
    """The output of an earlier run, for resuming; unreadable counts as none."""
    if not output_meta.is_file():
        return {}
    try:
        previous = json.loads(output_meta.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        log.warning("refiner: %s is not readable JSON; not resuming from it", output_meta)
        return {}
    return previous if isinstance(previous, dict) else {}
