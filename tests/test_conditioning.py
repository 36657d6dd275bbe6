"""Conditioning (SPEC §5) and decode (§6) on the tiny Wan models: bindweave/encoders/conditioning.py."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.pipelines.wan.pipeline_wan import WanPipeline, prompt_clean
from PIL import Image
from safetensors.torch import load_file, save_file

from bindweave.encoders.conditioning import (
    ClipImageEncoder,
    T5TextEncoder,
    VideoConditionCache,
    WanVae,
    assemble_condition,
    clean_prompt,
    make_reference_canvas,
    reference_condition,
)
from bindweave.io.inputs import load_reference_image
from bindweave.errors import BindWeaveInputError
from bindweave.testing.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from conftest import OPENS2V, needs_opens2v

# The demo resolution's canvas: latents 24 x 40.
DEMO_WIDTH, DEMO_HEIGHT = 320, 192


@pytest.fixture(scope="module")
def wan_folder(tiny_models) -> Path:
    return tiny_models.wan


@pytest.fixture(scope="module")
def t5(wan_folder) -> T5TextEncoder:
    return T5TextEncoder.from_folder(wan_folder, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def clip(wan_folder) -> ClipImageEncoder:
    return ClipImageEncoder.from_folder(wan_folder, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def vae(wan_folder) -> WanVae:
    return WanVae.from_folder(wan_folder, dtype=torch.float32, device="cpu")


def opens2v_image(name: str) -> Image.Image:
    return load_reference_image(OPENS2V / "Images" / name)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def count_calls(monkeypatch, obj, method: str) -> list:
    """Record every call of ``obj.method`` (and still run it)."""
    calls = []
    original = getattr(obj, method)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, method, wrapper)
    return calls


# ---- prompt cleaning ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, cleaned", [
    ("  a   man\n\twalks  ", "a man walks"),
    ("Tom &amp; Jerry", "Tom & Jerry"),
    ("&amp;lt;b&amp;gt; bold", "<b> bold"),  # escaped twice, unescaped twice
    ("the caf\u00c3\u00a9 on the corner", "the caf\u00e9 on the corner"),  # UTF-8 read as Latin-1
    ("\u201cquoted\u201d\u00a0text", '"quoted" text'),  # ftfy uncurls quotes; no-break space is whitespace
    ("", ""),
])
def test_clean_prompt(text, cleaned):
    assert clean_prompt(text) == cleaned
    assert clean_prompt(text) == prompt_clean(text)  # diffusers' copy of Wan's cleaning


# ---- T5 ----------------------------------------------------------------------------------------


def test_t5_rows_are_true_length_then_exact_zeros(t5):
    prompts = ["a man walks", "a woman with red hair is walking on the street   with a dog &amp; a cat"]
    embeds = t5.encode(prompts)
    assert embeds.shape == (2, 512, 32) and embeds.dtype == torch.float32

    lengths = t5.tokenizer([clean_prompt(p) for p in prompts], return_attention_mask=True).attention_mask
    lengths = [sum(mask) for mask in lengths]
    assert lengths[0] < lengths[1] < 512
    for row, length in zip(embeds, lengths):
        assert (row[:length].abs().sum(dim=-1) > 0).all()
        assert torch.equal(row[length:], torch.zeros_like(row[length:]))


def test_t5_equals_diffusers_wan_pipeline(t5):
    prompts = ["a man walks", "two dogs   in the park &amp; a child"]
    pipeline_parts = SimpleNamespace(tokenizer=t5.tokenizer, text_encoder=t5.model, _execution_device=t5.device)
    expected = WanPipeline._get_t5_prompt_embeds(pipeline_parts, prompts, max_sequence_length=512)
    assert torch.equal(t5.encode(prompts), expected)


def test_t5_truncates_long_prompts_to_512(t5):
    embeds = t5.encode(["dog " * 700])
    assert embeds.shape == (1, 512, 32)
    assert (embeds[0].abs().sum(dim=-1) > 0).all()  # every position is a real token


# ---- reference canvas --------------------------------------------------------------------------


def check_canvas(canvas, image: Image.Image, width: int, height: int, box: tuple[int, int, int, int]):
    assert canvas.box == box
    assert canvas.image.mode == "RGB" and canvas.image.size == (width, height)
    left, top, right, bottom = box
    expected_mask = torch.zeros(height, width)
    expected_mask[top:bottom, left:right] = 1
    assert canvas.mask.dtype == torch.float32 and torch.equal(canvas.mask, expected_mask)

    pixels = np.asarray(canvas.image)
    resized = image.resize((right - left, bottom - top), Image.LANCZOS)
    assert np.array_equal(pixels[top:bottom, left:right], np.asarray(resized))
    outside = expected_mask.numpy() == 0
    assert outside.any() and not pixels[outside].any()  # all black


@needs_opens2v
def test_canvas_portrait_image_scaled_by_height():
    man = opens2v_image("man.png")
    assert man.size == (668, 834)
    canvas = make_reference_canvas(man)
    # r = 720/834: 668 * r = 576.69 -> 576 (truncated); margin (1280 - 576) // 2 = 352.
    check_canvas(canvas, man, 1280, 720, box=(352, 0, 928, 720))


@needs_opens2v
def test_canvas_small_image_is_not_upscaled():
    human = opens2v_image("human.jpg")
    assert human.size == (320, 430)
    canvas = make_reference_canvas(human)
    check_canvas(canvas, human, 1280, 720, box=(480, 145, 800, 575))
    assert np.array_equal(np.asarray(canvas.image)[145:575, 480:800], np.asarray(human))


def test_canvas_wide_image_scaled_by_width():
    wide = random_image(2000, 500, seed=1)
    check_canvas(make_reference_canvas(wide), wide, 1280, 720, box=(0, 200, 1280, 520))


@needs_opens2v
@pytest.mark.parametrize("name, box", [
    ("man.png", (83, 0, 236, 192)),  # 668 * 192/834 = 153.78 -> 153, margin 167 // 2 = 83
    ("human.jpg", (89, 0, 231, 192)),  # 320 * 192/430 = 142.88 -> 142
    ("dog.jpg", (16, 0, 304, 192)),
])
def test_canvas_at_demo_resolution(name, box):
    image = opens2v_image(name)
    check_canvas(make_reference_canvas(image, DEMO_WIDTH, DEMO_HEIGHT), image, DEMO_WIDTH, DEMO_HEIGHT, box)


# ---- CLIP --------------------------------------------------------------------------------------


def test_clip_penultimate_layer_of_antialiased_resize(clip):
    canvas = make_reference_canvas(random_image(900, 700, seed=2)).image
    unit = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)[None].float() / 255
    resized = F.interpolate(unit, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    pixel_values = (resized - mean) / std
    assert torch.equal(clip.preprocess(canvas), pixel_values)

    tokens = clip.encode(canvas)
    assert tokens.shape == (1, 257, 24)
    expected = clip.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(tokens, expected)
    assert not torch.allclose(tokens, clip.model(pixel_values=pixel_values).last_hidden_state)


def test_clip_resize_matches_pil_bilinear_not_plain_interpolation(clip):
    # PIL's bilinear reduction is antialiased too: an independent check, up to PIL's uint8 rounding.
    canvas = make_reference_canvas(random_image(1280, 720, seed=3)).image
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    resized = clip.preprocess(canvas) * std + mean
    pil = torch.from_numpy(np.asarray(canvas.resize((224, 224), Image.BILINEAR)).copy()).permute(2, 0, 1)[None] / 255
    assert (resized - pil).abs().max() <= 1.5 / 255
    unit = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)[None].float() / 255
    aliased = F.interpolate(unit, size=(224, 224), mode="bilinear", align_corners=False)
    assert (aliased - pil).abs().max() > 20 / 255  # without antialias: visibly different


# ---- VAE ---------------------------------------------------------------------------------------


def latent_stats(vae: WanVae) -> tuple[torch.Tensor, torch.Tensor]:
    config = vae.model.config
    return (torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1), torch.tensor(config.latents_std).view(1, 16, 1, 1, 1))


def normalised(vae: WanVae, raw_latents: torch.Tensor) -> torch.Tensor:
    mean, std = latent_stats(vae)
    return (raw_latents - mean) / std


def test_vae_encode_normalises_the_posterior_mode(vae):
    video = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (1, 16, 2, 4, 6) and latents.dtype == torch.float32
    with torch.no_grad():
        raw = vae.model.encode(video).latent_dist.mean
    torch.testing.assert_close(latents, normalised(vae, raw), rtol=0, atol=1e-6)


def test_decode_to_frames_uint8_video(vae):
    latents = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    frames = vae.decode_to_frames(latents)
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8
    assert frames.shape == (1 + 4 * (2 - 1), 32, 48, 3)

    mean, std = latent_stats(vae)
    with torch.no_grad():
        video = vae.model.decode(latents * std + mean).sample[0].clamp(-1, 1)
    expected = torch.floor((video + 1) / 2 * 255 + 0.5).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(frames, expected.astype(np.uint8))
    assert frames.min() < 128 < frames.max()


def test_vae_tiling_option(wan_folder, vae):
    tiled = WanVae.from_folder(wan_folder, dtype=torch.float32, device="cpu", tiled=True)
    assert tiled.model.use_tiling and not vae.model.use_tiling
    assert tiled.fingerprint != vae.fingerprint  # tiled results differ slightly: not one cache entry


def test_load_refuses_incomplete_checkpoint(wan_folder, tmp_path):
    broken = tmp_path / "wan"
    shutil.copytree(wan_folder, broken)
    weights_file = broken / "image_encoder" / "model.safetensors"
    weights = load_file(weights_file)
    del weights[next(key for key in weights if "post_layernorm" in key)]
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(BindWeaveInputError, match="missing keys.*post_layernorm"):
        ClipImageEncoder.from_folder(broken, dtype=torch.float32, device="cpu")
    with pytest.raises(BindWeaveInputError, match="does not exist"):
        WanVae.from_folder(tmp_path / "nowhere", dtype=torch.float32, device="cpu")


# ---- reference condition -----------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3, 5])
def test_reference_condition_slots(vae, clip, monkeypatch, count):
    width, height = 96, 64  # small canvases keep the VAE fast; latents 12 x 8
    images = [random_image(120 + 30 * i, 150 - 20 * i, seed=10 + i) for i in range(count)]
    vae_calls = count_calls(monkeypatch, vae, "encode")
    clip_embeds, reference_latents = reference_condition(images, vae, clip, width, height)
    assert clip_embeds.shape == (1, 4 * 257, 24)
    assert reference_latents.shape == (1, 20, 4, height // 8, width // 8)

    used = min(count, 4)  # never more than 4 (the caller warns about the rest)
    assert len(vae_calls) == used
    for slot, image in enumerate(images[:used]):
        canvas = make_reference_canvas(image, width, height)
        assert torch.equal(clip_embeds[:, 257 * slot: 257 * (slot + 1)], clip.encode(canvas.image))
        mask = F.interpolate(canvas.mask[None, None], size=(height // 8, width // 8), mode="nearest")[0, 0]
        assert torch.equal(reference_latents[0, 0, slot], mask)
        assert 0 < mask.sum() < mask.numel()
        assert not reference_latents[0, 1:4, slot].any()
        (video,) = vae_calls[slot]  # the canvas in [-1, 1] as a 1-frame video
        canvas_pixels = torch.from_numpy(np.asarray(canvas.image).copy()).permute(2, 0, 1) / 255 * 2 - 1
        assert video.shape == (1, 3, 1, height, width) and torch.equal(video[0, :, 0], canvas_pixels)
        with torch.no_grad():
            raw = vae.model.encode(video).latent_dist.mode()
        torch.testing.assert_close(reference_latents[:, 4:, slot: slot + 1], normalised(vae, raw), rtol=0, atol=1e-6)
    assert not clip_embeds[:, 257 * used:].any()
    assert not reference_latents[:, :, used:].any()  # zeros in mask AND latent, not VAE(black)


def test_video_condition_cache(vae, tmp_path, monkeypatch):
    encodes = count_calls(monkeypatch, vae, "encode")
    cache = VideoConditionCache(tmp_path)
    condition = cache.get(vae, 5, 32, 48)
    assert condition.shape == (1, 20, 2, 4, 6) and condition.device.type == "cpu"
    assert len(encodes) == 1
    assert not condition[:, :4].any()
    (grey_clip,) = encodes[0]
    assert torch.equal(grey_clip, torch.zeros(1, 3, 5, 32, 48))  # 0 in [-1, 1]: mid grey
    with torch.no_grad():
        raw = vae.model.encode(grey_clip).latent_dist.mode()
    torch.testing.assert_close(condition[:, 4:], normalised(vae, raw), rtol=0, atol=1e-6)

    assert cache.get(vae, 5, 32, 48) is condition and len(encodes) == 1
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and vae.fingerprint in files[0].name and "5x32x48" in files[0].name

    assert torch.equal(VideoConditionCache(tmp_path).get(vae, 5, 32, 48), condition) and len(encodes) == 1

    assert VideoConditionCache(tmp_path).get(vae, 1, 32, 48).shape == (1, 20, 1, 4, 6)
    assert len(encodes) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_video_condition_cache_recomputes_unreadable_file_and_works_without_disk(vae, tmp_path, monkeypatch):
    expected = VideoConditionCache(None).get(vae, 1, 32, 48)
    assert not any(tmp_path.iterdir())
    VideoConditionCache(tmp_path).get(vae, 1, 32, 48)
    (cached_file,) = tmp_path.glob("*.safetensors")
    cached_file.write_bytes(b"truncated")
    encodes = count_calls(monkeypatch, vae, "encode")
    assert torch.equal(VideoConditionCache(tmp_path).get(vae, 1, 32, 48), expected)
    assert len(encodes) == 1
    assert torch.equal(load_file(cached_file)["video_condition"], expected)  # rewritten


def test_assemble_condition_puts_references_first(vae, clip):
    _, reference_latents = reference_condition([random_image(100, 80, seed=4)], vae, clip, 48, 32)
    video_condition = VideoConditionCache(None).get(vae, 5, 32, 48)
    condition = assemble_condition(reference_latents, video_condition)
    assert condition.shape == (1, 20, 4 + 2, 4, 6)
    assert torch.equal(condition[:, :, :4], reference_latents)
    assert torch.equal(condition[:, :, 4:], video_condition)
