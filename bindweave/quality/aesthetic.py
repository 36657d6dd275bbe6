"""Aesthetic score of a video, as OpenS2V-Eval computes it (``eval/get_aesscore.py`` of
PKU-YuanGroup/OpenS2V-Nexus): the LAION aesthetic predictor, a small MLP on the normalised CLIP
ViT-L/14 image embedding, averaged over frames spread evenly over the video. Higher is better
(about 1 to 10; OpenS2V's sample videos score ~5).

    scorer = AestheticScorer.from_files("weights/clip-vit-large-patch14", "weights/aesthetic-model.pth")
    scorer.score(frames)  # uint8 RGB [F, H, W, 3] -> float

The weights are the user's, in local files (nothing is downloaded): the CLIP folder in the
transformers layout (``openai/clip-vit-large-patch14``: config.json, the weights,
preprocessor_config.json) and the head's state dict (OpenS2V-Weight's ``aesthetic-model.pth``, or
the same tensors as safetensors). Matched: the frames (``AESTHETIC_FRAMES`` = 32, its default,
at ``linspace(0, F - 1)``), CLIP's own preprocessing from the folder, the L2-normalised projected
embedding, the head, the mean in float32. OpenS2V-Eval's other learned metrics (FaceSim, GmeScore,
NexusScore) need face detectors, a 7B multimodal embedder and an open-vocabulary detector and are
not supported here.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from bindweave.errors import BindWeaveInputError

AESTHETIC_FRAMES = 32  # OpenS2V-Eval's --num_frames default
# The LAION predictor's widths; between its linears, dropouts (0.2, 0.2, 0.1, none), kept so the
# published state dict loads as it is.
HEAD_WIDTHS = (768, 1024, 128, 64, 16, 1)
HEAD_DROPOUTS = (0.2, 0.2, 0.1, None)


class AestheticHead(torch.nn.Module):
    """The LAION aesthetic predictor's MLP (no activations: it is linear, as published); its
    linears sit at ``layers.0, .2, .4, .6, .7``, the published state dict's names."""

    def __init__(self):
        super().__init__()
        layers: list[torch.nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(HEAD_WIDTHS, HEAD_WIDTHS[1:])):
            layers.append(torch.nn.Linear(width_in, width_out))
            if index < len(HEAD_DROPOUTS) and HEAD_DROPOUTS[index] is not None:
                layers.append(torch.nn.Dropout(HEAD_DROPOUTS[index]))
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


class AestheticScorer:
    """CLIP vision tower + the aesthetic head, in eval mode on one device."""

    def __init__(self, clip: CLIPVisionModelWithProjection, processor: CLIPImageProcessorPil,
                 head: AestheticHead):
        self.clip, self.processor, self.head = clip.eval(), processor, head.eval()
        self.device = next(clip.parameters()).device

    @classmethod
    def from_files(cls, clip_folder: str | os.PathLike, head_path: str | os.PathLike,
                   device: str | torch.device = "cpu") -> AestheticScorer:
        """Load both from local files; a missing or mismatched file is one BindWeaveInputError."""
        clip_folder, head_path = Path(clip_folder), Path(head_path)
        if not (clip_folder / "config.json").is_file():
            raise BindWeaveInputError(f"--aesthetic-clip {clip_folder}: not a transformers CLIP folder (no "
                                      "config.json); give the local folder of openai/clip-vit-large-patch14.")
        if not head_path.is_file():
            raise BindWeaveInputError(f"--aesthetic-head {head_path}: no such file; give OpenS2V-Weight's "
                                      "aesthetic-model.pth (or the same tensors as .safetensors).")
        try:
            clip = CLIPVisionModelWithProjection.from_pretrained(clip_folder, local_files_only=True,
                                                                 dtype=torch.float32)
            processor = CLIPImageProcessorPil.from_pretrained(clip_folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise BindWeaveInputError(f"--aesthetic-clip {clip_folder}: cannot load CLIP from it: {error}") from error
        if clip.config.projection_dim != HEAD_WIDTHS[0]:
            raise BindWeaveInputError(f"--aesthetic-clip {clip_folder}: its embedding has {clip.config.projection_dim} "
                                      f"values, the aesthetic head takes {HEAD_WIDTHS[0]} (CLIP ViT-L/14's).")
        head = AestheticHead()
        try:
            head.load_state_dict(load_file(head_path) if head_path.suffix == ".safetensors"
                                 else torch.load(head_path, map_location="cpu", weights_only=True))
        except (RuntimeError, AttributeError, pickle.UnpicklingError, SafetensorError) as error:
            raise BindWeaveInputError(f"--aesthetic-head {head_path}: not the LAION aesthetic predictor's state "
                                      f"dict: {str(error).splitlines()[0]}") from error
        return cls(clip.to(device), processor, head.to(device))

    @torch.no_grad()
    def score(self, frames: np.ndarray) -> float:
        """Mean predicted aesthetic score of AESTHETIC_FRAMES frames of uint8 RGB ``[F, H, W, 3]``."""
        picked = np.linspace(0, len(frames) - 1, AESTHETIC_FRAMES).astype(int)
        images = [Image.fromarray(frames[index]) for index in picked]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        embeds = self.clip(pixel_values=pixels).image_embeds
        embeds = embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)
        return float(self.head(embeds).mean())
