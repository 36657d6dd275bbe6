"""``POST /v1/videos``: the form's fields checked into a :class:`VideoRequest`, and its uploads
stored and checked as images, before anything is queued.

    request = parse_video_request(fields, references=len(uploads), defaults=defaults, limits=settings)
    job_id = accept_job(store, settings, request, images)   # the uploads' bytes; 400 / 429, or queued

Every refusal is an :class:`~bindweave.serve.errors.ApiError` naming the field. The fields are the
OpenAI Videos API's (``prompt``, ``input_reference``, ``model``, ``seconds``, ``size``) plus
BindWeave's own (``seed``, ``num_frames``, ``steps``, ``guidance``, ``negative_prompt``, ``speed``).
A request's ``speed`` changes only the step cache (``exact`` and ``fast``: every step computed,
``fastest``: MagCache): the attention kernel and FP8 are part of the loaded model, fixed when the
server starts (``speed=`` on its command line).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

from bindweave.errors import BindWeaveInputError
from bindweave.io.inputs import MAX_REFERENCES, load_reference_image
from bindweave.settings.sampling import CacheSettings, SamplerSettings
from bindweave.serve.errors import ApiError
from bindweave.serve.settings import ServeSettings
from bindweave.serve.store import JobStore, new_job_id
from bindweave.settings.model import VideoSettings

IMAGE_FIELD = "input_reference"
TEXT_FIELDS = ("prompt", "model", "seconds", "size", "seed", "num_frames", "steps", "guidance", "negative_prompt",
               "speed", "callback_url")
MAX_URL_CHARS = 2048
SPEEDS = ("exact", "fast", "fastest")
MAX_PROMPT_CHARS = 10_000
MAX_SEED = 2**63 - 1  # the job table's INTEGER; torch's generator takes any of them
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class JobDefaults:
    """What a request leaves out: the server's video, sampler and step-cache settings."""

    video: VideoSettings
    sampler: SamplerSettings
    cache: CacheSettings


@dataclass(frozen=True)
class VideoRequest:
    """A checked request: everything the worker needs besides the uploaded references."""

    prompt: str
    references: int
    width: int
    height: int
    num_frames: int
    fps: int
    steps: int
    guidance: float
    seed: int
    speed: str | None  # None: the server's own step cache
    callback_url: str | None = None  # POSTed the video object when the job ends (bindweave/serve/callbacks.py)

    def video(self) -> VideoSettings:
        return VideoSettings(height=self.height, width=self.width, num_frames=self.num_frames, fps=self.fps)

    def sampler(self, default: SamplerSettings) -> SamplerSettings:
        return replace(default, num_steps=self.steps, guidance_scale=self.guidance, seed=self.seed)

    def cache(self, default: CacheSettings) -> CacheSettings:
        if self.speed is None:
            return default
        return replace(default, kind="magcache" if self.speed == "fastest" else "none")

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def seconds(self) -> str:
        return f"{self.num_frames / self.fps:.2f}"

    def as_json(self) -> dict:
        return asdict(self)


def parse_video_request(fields: dict[str, str], references: int, defaults: JobDefaults,
                        limits: ServeSettings) -> VideoRequest:
    """The request's text fields (one value each) and its number of uploads, checked."""
    unknown = sorted(set(fields) - set(TEXT_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}: the fields are {IMAGE_FIELD} (1 to {MAX_REFERENCES} "
                            f"images), {', '.join(TEXT_FIELDS)}", param=unknown[0], code="unknown_parameter")
    prompt = fields.get("prompt", "").strip()
    if not prompt:
        raise ApiError(400, "prompt is required: describe the video", param="prompt", code="missing_required_parameter")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}", param="prompt")
    if not 1 <= references <= MAX_REFERENCES:
        raise ApiError(400, f"{IMAGE_FIELD}: BindWeave needs 1 to {MAX_REFERENCES} reference images (the field "
                            f"repeated), got {references}", param=IMAGE_FIELD)
    if fields.get("model", limits.model_name) != limits.model_name:
        raise ApiError(400, f"model={fields['model']!r}: this server runs {limits.model_name!r}", param="model",
                       code="model_not_found")
    if fields.get("negative_prompt"):
        raise ApiError(400, "negative_prompt: BindWeave uses its fixed negative prompts (the reference's T5 and Qwen "
                            "ones, precomputed at start-up); a custom one is not supported: leave the field out",
                       param="negative_prompt", code="unsupported_parameter")
    width, height = _size(fields.get("size"), defaults.video, limits)
    fps = defaults.video.fps
    speed = fields.get("speed")
    if speed is not None and speed not in SPEEDS:
        raise ApiError(400, f"speed={speed!r} is not one of {', '.join(SPEEDS)} (per job only the step cache changes: "
                            "fastest turns MagCache on; kernels and FP8 are fixed when the server starts)",
                       param="speed")
    return VideoRequest(
        prompt=prompt, references=references, width=width, height=height,
        num_frames=_num_frames(fields, defaults.video, limits), fps=fps,
        steps=_integer(fields, "steps", defaults.sampler.num_steps, 1, limits.max_steps),
        guidance=_guidance(fields.get("guidance"), defaults.sampler.guidance_scale),
        seed=_integer(fields, "seed", defaults.sampler.seed, 0, MAX_SEED), speed=speed,
        callback_url=_callback_url(fields.get("callback_url"), limits))


def _callback_url(text: str | None, limits: ServeSettings) -> str | None:
    if text is None:
        return None
    if not limits.callbacks:
        raise ApiError(400, "callback_url: this server sends no callbacks (serve.callbacks=false); poll "
                            "GET /v1/videos/{id} instead", param="callback_url", code="unsupported_parameter")
    url = text.strip()
    if len(url) > MAX_URL_CHARS or not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", url):
        raise ApiError(400, f"callback_url={text[:80]!r} must be an http:// or https:// URL of at most {MAX_URL_CHARS} "
                            "characters", param="callback_url")
    return url


def _integer(fields: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    if name not in fields:
        return default
    text = fields[name].strip()
    if not re.fullmatch(r"-?[0-9]{1,20}", text):
        raise ApiError(400, f"{name}={fields[name]!r} is not an integer ({low} to {high})", param=name)
    value = int(text)
    if not low <= value <= high:
        raise ApiError(400, f"{name}={value} is out of range: {low} to {high}", param=name)
    return value


def _guidance(text: str | None, default: float) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_GUIDANCE:  # NaN fails too
        raise ApiError(400, f"guidance={text!r} must be a number from 0 to {MAX_GUIDANCE:g} (1: no guidance; the "
                            "reference uses 5)", param="guidance")
    return value


def _size(text: str | None, default: VideoSettings, limits: ServeSettings) -> tuple[int, int]:
    if text is None:
        return default.width, default.height
    found = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", text.strip().lower())
    if found is None:
        raise ApiError(400, f"size={text!r} must be WIDTHxHEIGHT, e.g. 1280x720", param="size")
    width, height = int(found.group(1)), int(found.group(2))
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise ApiError(400, f"size={text}: width and height must be multiples of 16, at least 16 (the VAE's 8x and "
                            "the patch's 2x)", param="size")
    if width * height > limits.max_video_pixels:
        raise ApiError(400, f"size={text} has {width * height:,} pixels; this server makes at most "
                            f"{limits.max_video_pixels:,} (serve.max_video_pixels), e.g. 1280x720", param="size")
    return width, height


def _num_frames(fields: dict[str, str], default: VideoSettings, limits: ServeSettings) -> int:
    """``num_frames`` (4k+1), or ``seconds`` turned into the nearest 4k+1 frames at the server's fps."""
    if "num_frames" in fields and "seconds" in fields:
        raise ApiError(400, "give seconds or num_frames, not both", param="num_frames")
    if "seconds" in fields:
        try:
            seconds = float(fields["seconds"])
        except ValueError:
            seconds = math.nan
        if not 0 < seconds <= limits.max_frames / default.fps:  # NaN fails too
            raise ApiError(400, f"seconds={fields['seconds']!r} must be a number above 0 and at most "
                                f"{limits.max_frames / default.fps:.2f} ({limits.max_frames} frames at "
                                f"{default.fps} fps)", param="seconds")
        return min(4 * round(seconds * default.fps / 4) + 1, 4 * ((limits.max_frames - 1) // 4) + 1)
    frames = _integer(fields, "num_frames", default.num_frames, 1, limits.max_frames)
    if (frames - 1) % 4:
        raise ApiError(400, f"num_frames={frames} must be 4k+1 (e.g. 81, 49, 17, 5)", param="num_frames")
    return frames


def accept_job(store: JobStore, limits: ServeSettings, request: VideoRequest, images: list[bytes]) -> str:
    """Store the uploads, check that each is an image within the limits, and queue the job: its id.

    The queue bound is checked before any file is written (the common refusal costs nothing) and
    again, atomically, when the record is added."""
    queue_full = ApiError(429, f"the queue is full ({limits.max_queue} jobs waiting, serve.max_queue): retry later",
                          code="queue_full", headers={"Retry-After": "10"})
    if store.counts()["queued"] >= limits.max_queue:
        raise queue_full
    job_id = new_job_id()
    files = store.files(job_id)
    try:
        for index, data in enumerate(images):
            path = files.write_reference(index, data)
            try:
                load_reference_image(path, max_pixels=limits.max_image_pixels)
            except BindWeaveInputError as error:  # the message names the field, not the server's path
                field = f"{IMAGE_FIELD}[{index}]"
                raise ApiError(400, str(error).replace(str(path), field), param=field) from None
        if not store.add(job_id, request.as_json(), limits.max_queue):
            raise queue_full
    except BaseException:
        files.remove()
        raise
    return job_id
