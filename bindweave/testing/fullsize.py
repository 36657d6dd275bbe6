"""Full-size random-weight model folders in the real layouts, for measuring (no weights download).

``write_fullsize_models(root, device)`` writes the 14B BindWeave DiT, the Wan VAE, UMT5-XXL and
CLIP ViT-H with the released configs and random bf16 weights, as sharded safetensors, so the
real loading code (strict checks, sharded loading, offload) can be timed on a GPU machine.
Tokenizer and image processor come from the tiny set (their files do not depend on the size).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from bindweave.io.checkpoint import keeps_fp32

# The released configs, written out (nothing is downloaded).
WAN_VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
UMT5_XXL_CONFIG = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
CLIP_VIT_H_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                         image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
QWEN25_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                         max_window_layers=28, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, sliding_window=32768,
                         use_sliding_window=False, hidden_act="silu")
QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
QWEN25_VL_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                           vision_end_token_id=151653)

@torch.no_grad()
def fill_random_(model: torch.nn.Module, generator: torch.Generator):
    """Weights ~ N(0, 1/fan_in) (unit-scale activations through each layer), norm scales 1, biases 0."""
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            param.normal_(0.0, (param[0].numel()) ** -0.5, generator=generator)
        elif "norm" in name and name.endswith("weight"):
            param.fill_(1.0)
        else:
            param.zero_()


SHARD_BYTES = 5 * 2**30


def write_random_checkpoint(model_factory, folder: Path, device: torch.device, seed: int,
                            weights_name: str = "diffusion_pytorch_model") -> None:
    """Build on meta, fill each tensor on ``device`` (bf16; diffusers' fp32 modules in fp32), and
    stream it to ``<weights_name>-0000k.safetensors`` shards with an index; ``config.json`` too."""
    import json

    with torch.device("meta"):
        model = model_factory()
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_config"):  # diffusers
        model.save_config(folder)
    else:  # transformers
        model.config.save_pretrained(folder)
    generator = torch.Generator(device).manual_seed(seed)
    fp32_modules = getattr(model, "_keep_in_fp32_modules", None)
    shard, shard_bytes, weight_map, index = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, index
        if shard:
            index += 1
            name = f"{weights_name}-{index:05d}.safetensors"
            save_file(shard, folder / name)
            weight_map.update({key: name for key in shard})
            shard, shard_bytes = {}, 0

    for key, meta in model.state_dict().items():
        dtype = torch.float32 if keeps_fp32(key, fp32_modules) else torch.bfloat16
        tensor = torch.empty(meta.shape, dtype=dtype, device=device)
        if tensor.ndim >= 2:
            tensor.normal_(0.0, tensor[0].numel() ** -0.5, generator=generator)
        else:
            tensor.fill_(1.0 if "norm" in key and key.endswith("weight") else 0.0)
        shard[key] = tensor.cpu()
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    total = sum((folder / name).stat().st_size for name in set(weight_map.values()))
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{weights_name}.safetensors.index.json").write_text(json.dumps(index_json))


def write_fullsize_models(root: Path, device: torch.device, seed: int = 0) -> tuple[Path, Path]:
    """``root/BindWeave`` (16.4 B params) and ``root/Wan2.1-I2V-14B-720P-Diffusers``; returns both."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from bindweave.testing.tiny import write_tiny_models
    from bindweave.model.transformer import BINDWEAVE_14B_CONFIG, BindWeaveTransformer

    dit, wan = root / "BindWeave", root / "Wan2.1-I2V-14B-720P-Diffusers"
    if not (dit / "config.json").exists():
        write_random_checkpoint(lambda: BindWeaveTransformer(**BINDWEAVE_14B_CONFIG), dit, device, seed)
    if not (wan / "image_encoder" / "config.json").exists():
        tiny = write_tiny_models(root / "tiny")
        for part in ("tokenizer", "image_processor", "scheduler"):
            shutil.copytree(tiny.wan / part, wan / part, dirs_exist_ok=True)
        torch.manual_seed(seed)
        with torch.device(device):
            vae = AutoencoderKLWan(**WAN_VAE_CONFIG, latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
        vae.save_pretrained(wan / "vae")
        write_random_checkpoint(lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG)), wan / "text_encoder",
                                device, seed, "model")
        write_random_checkpoint(lambda: CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H_CONFIG)), wan / "image_encoder",
                                device, seed, "model")
    return dit, wan


def write_fullsize_qwen(root: Path, device: torch.device, seed: int = 0) -> Path:
    """``root/Qwen2.5-VL-7B-Instruct``: the released text and vision sizes (8.3 B params) with random
    bf16 weights; tokenizer, chat template and image processor from the tiny set, whose special
    token ids the config keeps (they are all below the real vocabulary size)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from bindweave.testing.tiny import QWEN_DIR, write_tiny_models

    folder = root / QWEN_DIR
    if (folder / "config.json").exists():
        return folder
    tiny = write_tiny_models(root / "tiny").qwen
    tiny_config = Qwen2_5_VLConfig.from_pretrained(tiny)
    token_ids = {name: getattr(tiny_config, name) for name in QWEN25_VL_TOKEN_IDS}
    text = dict(QWEN25_VL_7B_TEXT, bos_token_id=tiny_config.text_config.bos_token_id,
                eos_token_id=tiny_config.text_config.eos_token_id)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=QWEN25_VL_7B_VISION, tie_word_embeddings=False,
                              **token_ids)
    staging = folder.with_name(folder.name + ".partial")
    for part in tiny.iterdir():
        if part.is_file() and part.suffix != ".safetensors" and part.name != "config.json":
            staging.mkdir(parents=True, exist_ok=True)
            shutil.copy2(part, staging / part.name)
    write_random_checkpoint(lambda: Qwen2_5_VLForConditionalGeneration(config), staging, device, seed, "model")
    staging.rename(folder)  # whole or absent: config.json marks it done
    return folder
