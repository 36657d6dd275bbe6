"""SPEC §5 conditioning and §6 decode: T5 text embeddings, reference canvases -> CLIP tokens and VAE
latents, the sample-independent video condition, and latents -> uint8 frames.

The models are the library classes (transformers' UMT5 encoder and CLIP vision model, diffusers'
AutoencoderKLWan) loaded from the Wan2.1-I2V-14B-720P-Diffusers folder layout; only BindWeave's
own glue (canvas, mask channels, zero padding of reference slots, caching) is written here.

Shapes use the 720P names: canvas 1280x720, latents 16 x (90, 160), condition 20 channels
(4 mask + 16 latent), 4 reference slots of 257 CLIP tokens each.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

from bindweave.io.checkpoint import resolve_folder
from bindweave.errors import BindWeaveInputError, refuse_incomplete_load
from bindweave.io.outputs import atomic_write

try:  # transformers 5: the torchvision-free class (CLIPImageProcessor warns and falls back to it)
    from transformers import CLIPImageProcessorPil as ClipImageProcessor
except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
    from transformers import CLIPImageProcessor as ClipImageProcessor

logger = logging.getLogger(__name__)

T5_MAX_LENGTH = 512
MASK_CHANNELS = 4
MAX_REFERENCES = 4


def clean_prompt(text: str) -> str:
    """Wan's ``basic_clean`` + ``whitespace_clean``: fix mojibake, unescape HTML twice, collapse whitespace.

    ``regex`` (not ``re``) as in Wan's tokenizer: its ``\\s`` is Unicode White_Space, which differs
    from ``re``'s for a few control characters.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


# The CLIP vision tower is saved with the projection head of the full CLIP model, which it does not use.
UNUSED_CHECKPOINT_KEYS = ("visual_projection.",)


def _load_pretrained(model_class, folder: Path, **kwargs):
    """``model_class.from_pretrained(folder)``, strict, with file errors named as the folder's."""
    try:
        model, loading_info = model_class.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except (OSError, ValueError) as error:  # missing or unreadable config/weights
        raise BindWeaveInputError(
            f"could not load {model_class.__name__} from {folder} ({error}): re-download that folder"
        ) from error
    refuse_incomplete_load(loading_info, f"checkpoint folder {folder}", "check that the download is complete and "
                           "belongs to Wan2.1-I2V-14B-720P-Diffusers", ignorable=UNUSED_CHECKPOINT_KEYS)
    return model.eval().requires_grad_(False)


# ---- T5 ----------------------------------------------------------------------------------------


class T5TextEncoder:
    """UMT5 encoder + tokenizer of the Wan folder; prompts -> zero-padded (B, 512, d_model) embeddings."""

    def __init__(self, tokenizer, model: UMT5EncoderModel):
        self.tokenizer = tokenizer
        self.model = model

    @classmethod
    def from_folder(cls, wan_folder: str | os.PathLike, dtype: torch.dtype, device: torch.device | str) -> T5TextEncoder:
        tokenizer_folder = resolve_folder(wan_folder, "tokenizer")
        encoder_folder = resolve_folder(wan_folder, "text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
        model = _load_pretrained(UMT5EncoderModel, encoder_folder, dtype=dtype).to(device)
        return cls(tokenizer, model)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, 512, d_model) in the encoder's dtype: each row's true tokens, then exact zeros.

        The zeros (not the encoder's outputs at pad positions) are what the DiT was trained on;
        this is diffusers' ``WanPipeline._get_t5_prompt_embeds``.
        """
        tokens = self.tokenizer(
            [clean_prompt(prompt) for prompt in prompts],
            max_length=T5_MAX_LENGTH,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(tokens.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        true_lengths = mask.sum(dim=1)
        padding = torch.arange(T5_MAX_LENGTH, device=self.device)[None, :] >= true_lengths[:, None]
        return hidden.masked_fill(padding.unsqueeze(-1), 0.0)


# ---- reference canvas --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceCanvas:
    """A reference image pasted on a black canvas.

    ``image``: PIL RGB, ``width x height``; ``mask``: float32 [height, width], 1 inside the pasted
    rectangle, 0 elsewhere; ``box``: that rectangle as (left, top, right, bottom), right/bottom
    exclusive.
    """

    image: Image.Image
    mask: torch.Tensor
    box: tuple[int, int, int, int]


def make_reference_canvas(image: Image.Image, width: int = 1280, height: int = 720) -> ReferenceCanvas:
    """Scale by ``r = min(width/w, height/h, 1)`` (never up), LANCZOS, paste centred on black.

    Rounding as BindWeave's ``RefTransform`` (s2v/tasks/inference/pipeline/wan_pipeline_s2v.py):
    the size is ``int(w * r)``, ``int(h * r)`` (truncated) and the offset floor-halves the margin.
    """
    source_width, source_height = image.size
    ratio = min(width / source_width, height / source_height, 1.0)
    new_width, new_height = int(source_width * ratio), int(source_height * ratio)
    left, top = (width - new_width) // 2, (height - new_height) // 2
    resized = image.convert("RGB").resize((new_width, new_height), Image.LANCZOS)  # same size: a copy
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(resized, (left, top))
    mask = torch.zeros(height, width, dtype=torch.float32)
    mask[top:top + new_height, left:left + new_width] = 1.0
    return ReferenceCanvas(image=canvas, mask=mask, box=(left, top, left + new_width, top + new_height))


def _image_to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 (1, 3, H, W) in [0, 1] (the reference's ``pixel / 255.0``)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).unsqueeze(0).float() / 255.0


# ---- CLIP --------------------------------------------------------------------------------------


class ClipImageEncoder:
    """CLIP ViT-H of the Wan folder; a canvas -> (1, 257, hidden) penultimate-layer tokens."""

    def __init__(self, model: CLIPVisionModel, image_mean: list[float], image_std: list[float]):
        self.model = model
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_folder(cls, wan_folder: str | os.PathLike, dtype: torch.dtype, device: torch.device | str) -> ClipImageEncoder:
        processor = ClipImageProcessor.from_pretrained(str(resolve_folder(wan_folder, "image_processor")))
        model = _load_pretrained(CLIPVisionModel, resolve_folder(wan_folder, "image_encoder"), dtype=dtype).to(device)
        return cls(model, list(processor.image_mean), list(processor.image_std))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def preprocess(self, canvas: Image.Image) -> torch.Tensor:
        """Canvas -> normalised float32 (1, 3, 224, 224) on the model's device.

        The reference resizes the [0, 1] tensor with torchvision ``v2.Resize([224, 224])``, which for
        tensors is exactly this antialiased bilinear ``interpolate`` (CLIPImageProcessor's own
        bicubic shortest-edge resize + centre crop would see a different picture).
        """
        pixels = _image_to_unit_tensor(canvas).to(self.device)
        size = (self.image_size, self.image_size)
        pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        return (pixels - self.image_mean.to(self.device)) / self.image_std.to(self.device)

    @torch.no_grad()
    def encode(self, canvas: Image.Image) -> torch.Tensor:
        """(1, 257, hidden) in the model's dtype: ``hidden_states[-2]``, the penultimate layer."""
        pixel_values = self.preprocess(canvas).to(self.model.dtype)
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]


# ---- VAE ---------------------------------------------------------------------------------------


class WanVae:
    """AutoencoderKLWan with the latent normalisation of the Wan pipelines.

    Normalised latents are ``(mode - latents_mean) / latents_std`` per channel; they are what the
    DiT sees and produces.
    """

    def __init__(self, model: AutoencoderKLWan):
        self.model = model
        config = model.config
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, config.z_dim, 1, 1, 1)
        self.latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, config.z_dim, 1, 1, 1)

    @classmethod
    def from_folder(cls, wan_folder: str | os.PathLike, dtype: torch.dtype, device: torch.device | str,
                    tiled: bool = False) -> WanVae:
        """``tiled``: encode/decode in overlapping spatial tiles (diffusers' ``enable_tiling``) to
        fit small GPUs; the result differs slightly at tile seams."""
        model = _load_pretrained(AutoencoderKLWan, resolve_folder(wan_folder, "vae"), torch_dtype=dtype).to(device)
        if tiled:
            model.enable_tiling()
        return cls(model)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    @property
    def spatial_compression(self) -> int:
        return self.model.config.scale_factor_spatial

    @property
    def temporal_compression(self) -> int:
        return self.model.config.scale_factor_temporal

    def latent_frames(self, num_frames: int) -> int:
        """The causal VAE keeps the first frame and compresses each following group of 4."""
        return 1 + (num_frames - 1) // self.temporal_compression

    @cached_property
    def fingerprint(self) -> str:
        """Identity of this VAE for caches: config, dtype, tiling and a strided sample of every weight.

        Hashing all weights would cost seconds; a few values per tensor tell checkpoints apart.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(dict(self.model.config), sort_keys=True, default=str).encode())
        digest.update(f"{self.dtype} tiled={self.model.use_tiling}".encode())
        samples = []
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            flat = tensor.detach().flatten()
            samples.append(flat[:: max(1, flat.numel() // 16)][:16].float())
        digest.update(torch.cat(samples).cpu().numpy().tobytes())  # one device->host copy
        return digest.hexdigest()[:16]

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> normalised float32 latents [B, 16, 1 + (F-1)//4, H//8, W//8]
        on the VAE's device (the posterior's mode: no sampling noise)."""
        posterior = self.model.encode(video.to(self.device, self.dtype)).latent_dist
        latents = posterior.mode().float()
        return (latents - self.latents_mean.to(latents.device)) / self.latents_std.to(latents.device)

    @torch.no_grad()
    def decode_to_frames(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents [1, 16, F_lat, h, w] -> uint8 frames [1 + 4*(F_lat-1), 8h, 8w, 3].

        To uint8 with ``(x + 1) / 2 * 255`` rounded to nearest, as BindWeave's reference decode
        (MindSpeed-MM ``decode_latents``: ``mul(255).add_(0.5)`` then the uint8 cast). Wan's own
        ``cache_video`` truncates instead, which darkens every pixel by half a level on average.
        """
        return self.decode_rows(latents, 0, latents.shape[-2], halo=0)

    @torch.no_grad()
    def decode_rows(self, latents: torch.Tensor, start: int, stop: int, halo: int) -> np.ndarray:
        """The frames of latent rows ``[start, stop)`` only (pixel rows ``8*start`` to ``8*stop``),
        decoded with ``halo`` more latent rows of context on each side, then cropped: a band of a
        parallel decode (parallel/decode.py). The whole range with no halo is :meth:`decode_to_frames`."""
        if latents.shape[0] != 1:
            raise ValueError(f"decode_to_frames takes one video, got a batch of {latents.shape[0]}")
        top, bottom = max(start - halo, 0), min(stop + halo, latents.shape[-2])
        latents = latents[..., top:bottom, :].to(self.device, torch.float32)
        latents = latents * self.latents_std.to(self.device) + self.latents_mean.to(self.device)
        video = self.model.decode(latents.to(self.dtype)).sample[0].float().clamp(-1.0, 1.0)  # [3, F, H, W]
        scale = self.spatial_compression
        video = video[:, :, (start - top) * scale:(stop - top) * scale]
        frames = ((video + 1.0) / 2.0 * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)
        return frames.permute(1, 2, 3, 0).cpu().numpy()


# ---- reference and video conditions ------------------------------------------------------------


def reference_condition(images: list[Image.Image], vae: WanVae, clip: ClipImageEncoder, width: int, height: int,
                        max_references: int = MAX_REFERENCES) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference images' CLIP tokens and VAE frames, in ``max_references`` slots.

    Returns ``clip_embeds`` (1, max_references * 257, hidden) on the CLIP device and
    ``reference_latents`` (1, 4 + 16, max_references, height // 8, width // 8) float32 on the VAE
    device. Slot i holds image i (only the first ``max_references`` are used): channel 0 the
    nearest-resized canvas mask, channels 1-3 zero, channels 4-19 the normalised latent of the
    canvas as a 1-frame video. Unused slots are exact zeros everywhere (not VAE(black)), as in the
    reference's ``merge_ref_*_feature``.
    """
    used = images[:max_references]
    latent_size = (height // vae.spatial_compression, width // vae.spatial_compression)
    reference_latents = torch.zeros(1, MASK_CHANNELS + vae.z_dim, max_references, *latent_size, device=vae.device)
    clip_slots = []
    for slot, image in enumerate(used):
        canvas = make_reference_canvas(image, width, height)
        clip_slots.append(clip.encode(canvas.image))
        pixels = _image_to_unit_tensor(canvas.image) * 2.0 - 1.0  # the reference's Normalize(0.5, 0.5)
        latent = vae.encode(pixels.unsqueeze(2))  # (1, 16, 1, h, w)
        mask = F.interpolate(canvas.mask[None, None], size=latent.shape[-2:], mode="nearest")
        reference_latents[:, 0, slot] = mask[:, 0].to(vae.device)
        reference_latents[:, MASK_CHANNELS:, slot] = latent[:, :, 0]
    tokens_per_image = (clip.image_size // clip.model.config.patch_size) ** 2 + 1  # patches + CLS
    clip_embeds = torch.zeros(1, max_references * tokens_per_image, clip.model.config.hidden_size,
                              dtype=clip.model.dtype, device=clip.device)
    if clip_slots:
        filled = torch.cat(clip_slots, dim=1)
        clip_embeds[:, : filled.shape[1]] = filled
    return clip_embeds, reference_latents


class VideoConditionCache:
    """The video part of the condition: VAE(an all-zero clip) behind an all-zero 4-channel mask.

    It depends only on the VAE and the shape (BindWeave has no first-frame conditioning), and at
    720P it costs an 81x720x1280 encode, so it is computed once per (VAE, frames, height, width),
    kept in memory and, with a ``cache_dir``, stored there for later processes.
    """

    def __init__(self, cache_dir: Path | None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._in_memory: dict[tuple[str, int, int, int], torch.Tensor] = {}

    def get(self, vae: WanVae, num_frames: int, height: int, width: int) -> torch.Tensor:
        """float32 (1, 4 + 16, 1 + (num_frames-1)//4, height // 8, width // 8) on the CPU."""
        key = (vae.fingerprint, num_frames, height, width)
        if key not in self._in_memory:
            expected_shape = (1, MASK_CHANNELS + vae.z_dim, vae.latent_frames(num_frames),
                              height // vae.spatial_compression, width // vae.spatial_compression)
            condition = self._read(key, expected_shape)
            if condition is None:
                condition = self._compute(vae, num_frames, height, width)
                self._write(key, condition)
            self._in_memory[key] = condition
        return self._in_memory[key]

    def _path(self, key: tuple[str, int, int, int]) -> Path:
        fingerprint, num_frames, height, width = key
        return self.cache_dir / f"wan_zero_video_{fingerprint}_{num_frames}x{height}x{width}.safetensors"

    def _read(self, key, expected_shape: tuple[int, ...]) -> torch.Tensor | None:
        if self.cache_dir is None or not self._path(key).is_file():
            return None
        path = self._path(key)
        try:
            condition = load_file(path)["video_condition"]
        except (SafetensorError, KeyError, OSError) as error:
            logger.warning("ignoring unreadable video-condition cache %s (%s); recomputing it", path, error)
            return None
        if tuple(condition.shape) != expected_shape:
            logger.warning("ignoring video-condition cache %s of shape %s (expected %s); recomputing it",
                           path, tuple(condition.shape), expected_shape)
            return None
        return condition

    def _write(self, key, condition: torch.Tensor) -> None:
        if self.cache_dir is None:
            return
        with atomic_write(self._path(key)) as temp_path:
            save_file({"video_condition": condition.contiguous()}, temp_path,
                      metadata={"vae_fingerprint": key[0], "frames_height_width": "x".join(map(str, key[1:]))})

    @staticmethod
    def _compute(vae: WanVae, num_frames: int, height: int, width: int) -> torch.Tensor:
        # 0 in [-1, 1] is mid grey; made on the VAE's device (at 720P it is 0.9 GB in float32).
        grey_clip = torch.zeros(1, 3, num_frames, height, width, dtype=vae.dtype, device=vae.device)
        latents = vae.encode(grey_clip).cpu()
        mask = torch.zeros(1, MASK_CHANNELS, *latents.shape[2:])
        return torch.cat([mask, latents], dim=1)


def assemble_condition(reference_latents: torch.Tensor, video_condition: torch.Tensor) -> torch.Tensor:
    """(1, 20, 4, h, w) + (1, 20, F_lat, h, w) -> (1, 20, 4 + F_lat, h, w): references first in time."""
    return torch.cat([reference_latents, video_condition.to(reference_latents.device, reference_latents.dtype)], dim=2)
