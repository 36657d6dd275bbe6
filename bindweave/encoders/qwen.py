"""The one Qwen2.5-VL loader and input builder, shared by stage 2 (extract) and stage 1 (refine).

The reference builds its inputs with transformers' `Qwen2_5_VLProcessor` and qwen-vl-utils'
`process_vision_info` (SPEC §3). Neither can run without torchvision, which this project does not
install (qwen-vl-utils imports it at import time; transformers cannot build the processor's video
half without it, transformers#48558). So the inputs are built here from the processor's parts, in
its order, and this is the only path (GPU machines use it too, so every machine gets the same ids):

1. `prescale_references`: BindWeave's own x0.75 / x0.3 pre-scale, first 4 images.
2. `resize_for_vision`: what `process_vision_info` does to a PIL image (`smart_resize` to
   multiples of 28 within its default pixel limits, then PIL `resize` with the default filter).
3. The chat template renders the text with one `<|image_pad|>` per image; each is expanded to
   `grid_t * grid_h * grid_w / merge_size**2` copies, as the processor's `replace_image_token`.
4. The Qwen2-VL image processor (PIL backend, as the reference's transformers used) gives
   `pixel_values` and `image_grid_thw`; its own resize is a no-op after step 2.
5. `mm_token_type_ids` (1 on image tokens): transformers 5 computes the 3-D multimodal RoPE
   positions only when it is passed, and silently falls back to 1-D positions otherwise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from bindweave.io.checkpoint import folder_fingerprint, resolve_folder
from bindweave.io.inputs import MAX_REFERENCES
from bindweave.errors import BindWeaveInputError, refuse_incomplete_load
from bindweave.settings.qwen import QwenSettings
from bindweave.stages.memory import GIB, cap_gpu_memory, gpu_memory_within

# SPEC §3 pre-scale: references over 720P area shrink to 30 %, the others to 75 %.
LARGE_IMAGE_PIXELS = 720 * 1280
LARGE_IMAGE_SCALE = 0.3
IMAGE_SCALE = 0.75

# qwen-vl-utils' image defaults (vision_process.py): sides are multiples of patch 14 x merge 2,
# and an image has 4 to 16384 merged tokens.
VISION_FACTOR = 28
MIN_PIXELS = 4 * VISION_FACTOR * VISION_FACTOR
MAX_PIXELS = 16384 * VISION_FACTOR * VISION_FACTOR
MAX_ASPECT_RATIO = 200

IMAGE_TOKEN = "<|image_pad|>"
TEXT_TOKEN_TYPE, IMAGE_TOKEN_TYPE = 0, 1


@dataclass
class QwenVL:
    """The loaded model and its text and image preprocessing, plus what identifies the weights."""

    model: Qwen2_5_VLForConditionalGeneration
    tokenizer: object  # the folder's Qwen2 tokenizer (with the chat template)
    image_processor: Qwen2VLImageProcessorPil
    identity: dict  # {"model", "revision", "fingerprint", "dtype"}: provenance of outputs

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size


def qwen_folder(settings: QwenSettings) -> Path:
    """The model folder: the tiny set under `tiny_root`, else `path` (a folder or HF repo id)."""
    if settings.tiny_root:
        from bindweave.testing.tiny import write_tiny_models

        return write_tiny_models(Path(settings.tiny_root)).qwen
    if not settings.path:
        raise BindWeaveInputError("qwen.path is not set: pass qwen=qwen2_5_vl_7b or qwen.path=FOLDER_OR_REPO_ID")
    return resolve_folder(settings.path, revision=settings.revision)


def load_qwen(settings: QwenSettings) -> QwenVL:
    """Load model, tokenizer and image processor from one folder; refuse incomplete weights."""

    folder = qwen_folder(settings)
    device = settings.resolved_device()
    dtype = settings.torch_dtype(device)
    refuse_what_cannot_fit(folder, device, dtype, settings.gpu_memory_gib)
    try:
        model, loading_info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(folder), dtype=dtype, device_map=str(device),
            attn_implementation=settings.attn_implementation, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
    except (OSError, ValueError) as error:  # missing or unreadable config, weights or tokenizer files
        raise BindWeaveInputError(
            f"could not load Qwen2.5-VL from {folder} ({error}): point qwen.path at a complete "
            f"Qwen2.5-VL-7B-Instruct folder (or re-download it)") from error
    refuse_incomplete_load(loading_info, f"Qwen2.5-VL folder {folder}",
                           "check that the download is complete and is Qwen2.5-VL-7B-Instruct")
    tokenizer.chat_template = processor_chat_template(folder, tokenizer)
    identity = {**folder_fingerprint(folder), "model": settings.path or str(folder), "dtype": str(dtype)}
    return QwenVL(model.eval().requires_grad_(False), tokenizer, image_processor, identity)


# Over the weights: one prefill's activations (a few thousand tokens), the CUDA context, fragmentation.
QWEN_WORKSPACE_GIB = 2.0


def refuse_what_cannot_fit(folder: Path, device: torch.device, dtype: torch.dtype, limit_gib: float | None) -> None:
    """Cap the allocator at ``qwen.gpu_memory_gib`` and refuse, before reading a weight, a model
    that cannot fit the GPU memory left (Qwen2.5-VL-7B: 15.5 GiB in bf16)."""
    try:
        free_gib = gpu_memory_within(device, limit_gib, "qwen.gpu_memory_gib")
    except ValueError as error:
        raise BindWeaveInputError(str(error)) from None
    cap_gpu_memory(device, limit_gib)
    if free_gib is None:
        return
    on_disk = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    need_gib = on_disk * dtype.itemsize / 2 / GIB + QWEN_WORKSPACE_GIB  # the released files are bf16
    if need_gib > free_gib:
        limit = f" within qwen.gpu_memory_gib={limit_gib}" if limit_gib else ""
        raise BindWeaveInputError(
            f"Qwen2.5-VL from {folder} needs ~{need_gib:.1f} GiB on {device} in {dtype} and {free_gib:.1f} GiB are "
            f"free{limit}: free the GPU (or raise qwen.gpu_memory_gib), or run stage 2 on a larger GPU "
            f"(it runs once per sample, offline)")


def processor_chat_template(folder: Path, tokenizer) -> str:
    """The template the reference's `processor.apply_chat_template` renders with: the processor's
    own (`chat_template.jinja`, else the older `chat_template.json`), else the tokenizer's."""
    jinja_file, json_file = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    if json_file.is_file():
        try:
            return json.loads(json_file.read_text(encoding="utf-8"))["chat_template"]
        except (ValueError, KeyError, TypeError):
            raise BindWeaveInputError(f"{json_file} is not a chat template file: re-download the Qwen folder") from None
    if tokenizer.chat_template:
        return tokenizer.chat_template
    raise BindWeaveInputError(f"{folder} has no chat template (chat_template.jinja, chat_template.json or "
                              f"tokenizer_config.json): re-download the Qwen2.5-VL-7B-Instruct folder")


def prescale_references(images: Sequence[Image.Image]) -> list[Image.Image]:
    """SPEC §3: each image x0.3 if it has more pixels than 720x1280, else x0.75; first 4 only.

    Sizes are truncated to integers and PIL's default filter is used, as in the reference.
    """
    scaled = []
    for image in images[:MAX_REFERENCES]:
        width, height = image.size
        scale = LARGE_IMAGE_SCALE if width * height > LARGE_IMAGE_PIXELS else IMAGE_SCALE
        scaled.append(image.resize((int(width * scale), int(height * scale))))
    return scaled


def smart_resize(height: int, width: int) -> tuple[int, int]:
    """qwen-vl-utils' `smart_resize` with its image defaults: the `(height, width)` nearest the
    input's with both sides multiples of 28 and the area within [MIN_PIXELS, MAX_PIXELS].

    Not transformers' copy, which differs for sides under 14 pixels (it lets them round to 0).
    """
    if min(height, width) < 1 or max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise BindWeaveInputError(
            f"a reference image of {width}x{height} (after the pre-scale) is too small or more than "
            f"{MAX_ASPECT_RATIO}:1 wide or tall, which Qwen2.5-VL cannot take: crop or replace it")
    h_bar = max(VISION_FACTOR, round(height / VISION_FACTOR) * VISION_FACTOR)
    w_bar = max(VISION_FACTOR, round(width / VISION_FACTOR) * VISION_FACTOR)
    if h_bar * w_bar > MAX_PIXELS:
        beta = math.sqrt(height * width / MAX_PIXELS)
        h_bar = math.floor(height / beta / VISION_FACTOR) * VISION_FACTOR
        w_bar = math.floor(width / beta / VISION_FACTOR) * VISION_FACTOR
    elif h_bar * w_bar < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (height * width))
        h_bar = math.ceil(height * beta / VISION_FACTOR) * VISION_FACTOR
        w_bar = math.ceil(width * beta / VISION_FACTOR) * VISION_FACTOR
    return h_bar, w_bar


def resize_for_vision(image: Image.Image) -> Image.Image:
    """`process_vision_info` for one PIL image: `smart_resize`, then PIL `resize` (default filter)."""
    height, width = smart_resize(image.height, image.width)
    return image.resize((width, height))


def build_messages(text: str, images: Sequence[Image.Image]) -> list[dict]:
    """One user message, text FIRST and then the images in order (SPEC §3)."""
    content = [{"type": "text", "text": text}] + [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": content}]


def build_inputs(qwen: QwenVL, text: str, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
    """Model inputs for one prompt and its (already pre-scaled) images, batch size 1, on the model's device.

    Keys: input_ids, attention_mask (all ones: one unpadded sequence), pixel_values,
    image_grid_thw, mm_token_type_ids.
    """
    # The chat template adds the default system prompt and, last, the assistant prefix.
    rendered = qwen.tokenizer.apply_chat_template(build_messages(text, images), tokenize=False,
                                                  add_generation_prompt=True)
    vision = qwen.image_processor(images=[resize_for_vision(image) for image in images], return_tensors="pt")
    merge_area = qwen.image_processor.merge_size ** 2
    pieces = rendered.split(IMAGE_TOKEN)
    if len(pieces) != len(images) + 1:
        raise BindWeaveInputError(f"the rendered chat holds {len(pieces) - 1} {IMAGE_TOKEN} placeholders for "
                                  f"{len(images)} images: remove {IMAGE_TOKEN} from the prompt, or re-download the "
                                  f"Qwen folder's chat template")
    expanded = pieces[0]
    for grid, piece in zip(vision["image_grid_thw"], pieces[1:]):
        expanded += IMAGE_TOKEN * (int(grid.prod()) // merge_area) + piece
    input_ids = qwen.tokenizer(expanded, return_tensors="pt")["input_ids"]
    image_token_id = qwen.model.config.image_token_id
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
        "mm_token_type_ids": torch.where(input_ids == image_token_id, IMAGE_TOKEN_TYPE, TEXT_TOKEN_TYPE),
    }
    return {name: tensor.to(qwen.device) for name, tensor in inputs.items()}


def image_token_counts(qwen: QwenVL, inputs: dict[str, torch.Tensor]) -> list[int]:
    """Merged image tokens per image of `inputs`, in order."""
    merge_area = qwen.image_processor.merge_size ** 2
    return [int(grid.prod()) // merge_area for grid in inputs["image_grid_thw"]]


@torch.inference_mode()
def prefill_hidden_states(model: Qwen2_5_VLForConditionalGeneration, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One prefill forward, no generation: the language model's `last_hidden_state`, i.e. the last
    layer after the final RMSNorm (= `hidden_states[-1]`), shape `[1, L, hidden_size]`."""
    return model.model(**inputs, use_cache=False).last_hidden_state
