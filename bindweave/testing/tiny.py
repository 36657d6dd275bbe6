"""Tiny random stand-ins for every model BindWeave loads, in the real Hugging Face layouts.

Tests and the fresh-machine demo point the project's real loading code at these folders: the
same classes, folder layouts, file names and weight key names as
``Wan-AI/Wan2.1-I2V-14B-720P-Diffusers``, ``Qwen/Qwen2.5-VL-7B-Instruct`` and ``BindWeave``,
but with 30k-180k seeded random float32 parameters each (about 2 MB in all, written in about a
second on a CPU once torch, diffusers and transformers are imported). Tokenizers are built here
from fixed vocabularies, so nothing is downloaded. The outputs are noise; only shapes, dtypes,
files and the loading paths are real.

    python -m bindweave.testing.tiny ROOT [--seed N]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from bindweave.sampling.sampler import unipc_config
from bindweave.settings.sampling import SamplerSettings
from bindweave.errors import BindWeaveInputError
from bindweave.model.transformer import TINY_CONFIG, BindWeaveTransformer

WAN_DIR = "Wan2.1-I2V-14B-720P-Diffusers"
BINDWEAVE_DIR = "BindWeave"
QWEN_DIR = "Qwen2.5-VL-7B-Instruct"

# Bump when the written files change, so sets written by an older version are rewritten.
FORMAT_VERSION = "bindweave-tiny-1"
# Written last: its presence (with the right content) means the set is complete.
MARKER_NAME = "TINY_MODELS"
LOCK_NAME = ".tiny-models.lock"

# ---- Wan2.1-I2V-14B-720P-Diffusers ----------------------------------------------------------

WAN_MODEL_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    "image_encoder": ["transformers", "CLIPVisionModel"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    # Listed as in the real repo; the tiny set has no transformer/ folder because BindWeave/
    # replaces the stock DiT.
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}

# The released Wan2.1 VAE's per-channel latent statistics: the pipeline normalises latents with
# them, so real values keep the tiny latents on the real scale.
WAN_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

# Real compression (4x time with the causal first frame, 8x space, 16 channels) so latent
# shapes are the real ones: 81x720x1280 -> 21x90x160. Only the widths and depth shrink.
TINY_VAE = dict(
    base_dim=4,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],  # the mid block's single attention is built in and cannot be turned off
    temperal_downsample=[False, True, True],
    latents_mean=WAN_LATENTS_MEAN,
    latents_std=WAN_LATENTS_STD,
)

# d_model 32 is the BindWeave tiny DiT's text_dim.
TINY_UMT5 = dict(
    d_model=32,
    d_ff=64,
    d_kv=16,
    num_layers=2,
    num_heads=2,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
)

# hidden_size 24 is the tiny DiT's image_dim; 224 / 14 = 16x16 patches + CLS = 257 tokens, the
# number BindWeave splits its context at.
TINY_CLIP = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=224,
    patch_size=14,
    projection_dim=16,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)

CLIP_KEY_PREFIX = "vision_model."

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The released image_processor/: OpenAI CLIP preprocessing (shortest side 224, centre crop 224).
CLIP_IMAGE_PROCESSOR = dict(
    size={"shortest_edge": 224},
    crop_size={"height": 224, "width": 224},
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
)


# Words the tokenizers know whole; anything else falls back to single characters (and, for the
# T5 tokenizer, characters outside T5_CHARS to <unk>), so any English prompt tokenizes.
COMMON_WORDS = (
    "a an the and or but of in on at to from with without into over under by for as is are was "
    "be it its this that his her their he she they we you i not no very all one two three "
    "man woman men women person people boy girl child face hair eyes hand hands dog cat animal "
    "car street road city park room house table chair window door tree grass sky sun water "
    "light shirt dress jacket red blue green white black yellow brown small large young old "
    "walking walks running sitting standing holding looking smiling talking wearing playing "
    "camera shot close view background slowly video scene high quality detailed realistic"
).split()
T5_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,;:!?'\"-_()[]/&%$#@*+=<>~`|\\^{}"
)
# Unigram log-probabilities: a whole word beats spelling it out, and "▁" + letters is the
# fallback for words not in COMMON_WORDS.
WORD_SCORE, SPACE_SCORE, CHAR_SCORE = -3.0, -4.0, -6.0
SPIECE_SPACE = "▁"

# ---- Qwen2.5-VL-7B-Instruct ----------------------------------------------------------------

# The released tokenizer's added tokens, in its order (ids 151643..151664 there; here they
# directly follow the small byte-level vocabulary). The last eight are not "special".
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
# Like the released model, the embedding table is padded past the tokenizer's length, so code
# must not assume the two are equal.
QWEN_VOCAB_MULTIPLE = 64

# The released Qwen2.5-VL-7B-Instruct chat template, verbatim.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The released preprocessor_config.json: it decides the image grid and so the number of
# <|image_pad|> tokens, which must be the real ones.
QWEN_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

# hidden_size 40 is the tiny DiT's mllm_dim. head_dim = 40 / 2 = 20, and the multimodal RoPE
# sections (time, height, width) must sum to head_dim / 2.
TINY_QWEN_TEXT = dict(
    hidden_size=40,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,  # grouped-query attention, as the real 28 query / 4 kv heads
    max_position_embeddings=128000,
    max_window_layers=2,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_scaling={"type": "mrope", "mrope_section": [2, 4, 4]},
    sliding_window=32768,
    use_sliding_window=False,
    hidden_act="silu",
)
TINY_QWEN_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=40,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],  # the real model alternates windowed and full attention too
    tokens_per_second=2,
    hidden_act="silu",
)


@dataclass(frozen=True)
class TinyModelPaths:
    """The three model folders of a tiny set, named as the real downloads."""

    wan: Path
    bindweave: Path
    qwen: Path


def write_tiny_models(root: Path, seed: int = 0) -> TinyModelPaths:
    """Write the tiny set under ``root`` (once per seed) and return its three folders.

    Same seed, same bytes. The set is built in a temporary folder inside ``root`` and moved into
    place; the marker file is written last, so a set with a marker is complete and is returned
    as it is. Refuses to touch model folders that a marker does not say are tiny ones.
    """
    root = Path(root)
    paths = TinyModelPaths(root / WAN_DIR, root / BINDWEAVE_DIR, root / QWEN_DIR)
    stamp = f"{FORMAT_VERSION} seed={seed}\n"
    marker = root / MARKER_NAME
    if _is_complete(marker, stamp):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "a") as lock:
        # Several processes (test workers, ranks of one launch) may ask for the same set.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(marker, stamp):  # another process wrote it while this one waited
            return paths
        if not marker.is_file():
            _refuse_foreign_folders(paths)
        with tempfile.TemporaryDirectory(dir=root, prefix=".tiny-staging-") as tmp:
            staging = Path(tmp)
            _write_wan(staging / WAN_DIR, seed)
            _write_bindweave(staging / BINDWEAVE_DIR, seed)
            _write_qwen(staging / QWEN_DIR, seed)
            marker.unlink(missing_ok=True)  # from here until the end the old set is incomplete
            for folder in (paths.wan, paths.bindweave, paths.qwen):
                if folder.exists():  # an older tiny set: moved out and deleted with staging
                    folder.rename(staging / f"old-{folder.name}")
                (staging / folder.name).rename(folder)
            _write_atomically(marker, stamp)
    return paths


def _is_complete(marker: Path, stamp: str) -> bool:
    return marker.is_file() and marker.read_text() == stamp


def _refuse_foreign_folders(paths: TinyModelPaths) -> None:
    # Without a marker, an existing folder may hold real weights: never overwrite it.
    for folder in (paths.wan, paths.bindweave, paths.qwen):
        if folder.exists():
            raise BindWeaveInputError(
                f"{folder} exists but is not a tiny model set written by bindweave.testing.tiny (no "
                f"{MARKER_NAME} file beside it); remove it or choose another root folder."
            )


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_bindweave(folder: Path, seed: int) -> None:
    # The DiT's class and tiny config live with the model code.

    write_tiny_bindweave(folder, seed)


# ---- Wan --------------------------------------------------------------------------------------


def write_tiny_bindweave(folder: Path, seed: int = 0) -> None:
    """Write a tiny seeded BindWeave DiT as a real checkpoint folder (config.json + safetensors)."""
    torch.manual_seed(seed)
    model = BindWeaveTransformer(**TINY_CONFIG)
    model.save_pretrained(folder, safe_serialization=True)


def _write_wan(folder: Path, seed: int) -> None:
    folder.mkdir(parents=True)
    model_index = {"_diffusers_version": diffusers.__version__, **WAN_MODEL_INDEX}
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    _write_vae(folder / "vae", seed)
    _write_umt5(folder / "text_encoder", seed)
    _write_t5_tokenizer(folder / "tokenizer")
    _write_clip(folder / "image_encoder", seed)
    # The PIL flavour needs no torchvision and writes the same file, typed "CLIPImageProcessor".
    CLIPImageProcessorPil(**CLIP_IMAGE_PROCESSOR).save_pretrained(folder / "image_processor")
    UniPCMultistepScheduler(**unipc_config(SamplerSettings())).save_config(folder / "scheduler")


def _write_vae(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    AutoencoderKLWan(**TINY_VAE).save_pretrained(folder, safe_serialization=True)


def _write_umt5(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(_t5_vocab()), **TINY_UMT5)
    UMT5EncoderModel(config).save_pretrained(folder, safe_serialization=True)


def _t5_vocab() -> list[tuple[str, float]]:
    """SentencePiece-style Unigram vocabulary; <pad>, </s>, <unk> at ids 0, 1, 2 as in (U)MT5."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = [(SPIECE_SPACE + word, WORD_SCORE) for word in COMMON_WORDS]
    chars = [(char, CHAR_SCORE) for char in T5_CHARS]
    return specials + [(SPIECE_SPACE, SPACE_SCORE)] + words + chars


def _write_t5_tokenizer(folder: Path) -> None:
    # extra_ids=0: the T5 span-corruption sentinels are never used to encode prompts.
    T5Tokenizer(vocab=_t5_vocab(), extra_ids=0).save_pretrained(folder)


def _write_clip(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(folder, safe_serialization=True)
    # transformers 5 dropped CLIPVisionModel's `vision_model.` wrapper and saves bare keys; the
    # released checkpoint has the prefix, which every transformers version loads, so write that.
    weights_file = folder / "model.safetensors"
    weights = {
        key if key.startswith(CLIP_KEY_PREFIX) else CLIP_KEY_PREFIX + key: tensor
        for key, tensor in load_file(weights_file).items()
    }
    save_file(weights, weights_file, metadata={"format": "pt"})


# ---- Qwen2.5-VL -------------------------------------------------------------------------------


def _write_qwen(folder: Path, seed: int) -> None:
    tokenizer = _qwen_tokenizer()
    tokenizer.save_pretrained(folder)  # also writes chat_template.jinja, which processors read
    # Written as the released file rather than saved from a Qwen2_5_VLProcessor: transformers
    # cannot build that processor without torchvision (its video half needs it), and this
    # project does not install torchvision.
    preprocessor_config = json.dumps(QWEN_PREPROCESSOR_CONFIG, indent=2) + "\n"
    (folder / "preprocessor_config.json").write_text(preprocessor_config)

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            TINY_QWEN_TEXT,
            vocab_size=-(-len(tokenizer) // QWEN_VOCAB_MULTIPLE) * QWEN_VOCAB_MULTIPLE,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
        ),
        vision_config=TINY_QWEN_VISION,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE: the 256 byte symbols (GPT-2 order, as Qwen's first ids), merges that
    spell out " " + each common word left to right, then the released model's added tokens."""
    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    merges = []
    for word in COMMON_WORDS:
        piece = "Ġ"  # the byte-level symbol of a space
        for symbol in word:
            if piece + symbol not in vocab:
                merges.append((piece, symbol))
                vocab[piece + symbol] = len(vocab)
            piece += symbol
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,  # byte-level: every string is spelled in known symbols
        eos_token=None,  # added below, after <|endoftext|>, to keep the released ids' order
        pad_token=None,
        errors="replace",
        split_special_tokens=False,
        model_max_length=131072,
    )
    tokenizer.add_special_tokens(
        {"pad_token": "<|endoftext|>", "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])}
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.add_tokens([AddedToken(token, normalized=False) for token in QWEN_ADDED_TOKENS])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bindweave.testing.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to write the three model folders into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    paths = write_tiny_models(args.root, args.seed)
    for folder in (paths.wan, paths.bindweave, paths.qwen):
        print(folder)


if __name__ == "__main__":
    main()
