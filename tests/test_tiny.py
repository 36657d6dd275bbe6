"""The tiny model set loads through the real classes offline, with the real shapes, and is
written deterministically, once."""

import json

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

from bindweave.errors import BindWeaveInputError
from bindweave.testing.tiny import LOCK_NAME, MARKER_NAME, main, write_tiny_models

SEED = 0
PROMPT = "A man walking his dog in the park, Ünïcödé 日本 text."


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Every load must work from the folders alone. huggingface_hub reads the variable once, at
    # import, so its constant is patched too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny"), seed=SEED)


def image(height, width, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def files(root):
    return {path.relative_to(root): path for path in sorted(root.rglob("*")) if path.is_file()}


def test_layout_matches_the_real_repos(tiny):
    wan = tiny.wan
    assert wan.name == "Wan2.1-I2V-14B-720P-Diffusers"
    assert tiny.bindweave.name == "BindWeave" and tiny.qwen.name == "Qwen2.5-VL-7B-Instruct"
    index = json.loads((wan / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    for component in ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler"):
        assert (wan / component).is_dir() and index[component][0] in ("diffusers", "transformers")
    assert (wan / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny.bindweave / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny.qwen / "model.safetensors").is_file()
    total = sum(path.stat().st_size for path in files(wan.parent).values())
    assert total < 5_000_000


def test_vae_keeps_the_real_compression(tiny):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(tiny.wan / "vae").eval()
    assert vae.config.z_dim == 16 and len(vae.config.latents_mean) == len(vae.config.latents_std) == 16
    video = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(video).latent_dist.mode()
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 16, 2, 8, 8)  # 1 + (5 - 1) / 4 frames, 64 / 8 pixels
    assert decoded.shape == video.shape
    assert next(vae.parameters()).dtype == torch.float32


def test_t5_tokenizer_and_text_encoder(tiny):
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(tiny.wan / "tokenizer")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    batch = tokenizer(
        [PROMPT],
        padding="max_length",
        max_length=512,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    ids, mask = batch.input_ids[0], batch.attention_mask[0]
    length = int(mask.sum())
    assert ids.shape == (512,) and ids[length - 1] == 1 and (ids[length:] == 0).all()
    assert tokenizer.unk_token_id in ids[:length]  # characters outside the vocabulary
    assert tokenizer("x " * 1000, max_length=512, truncation=True).input_ids[-1] == 1

    encoder = UMT5EncoderModel.from_pretrained(tiny.wan / "text_encoder").eval()
    with torch.no_grad():
        states = encoder(batch.input_ids, batch.attention_mask).last_hidden_state
    assert states.shape == (1, 512, 32)


def test_clip_gives_257_tokens(tiny):
    from transformers import CLIPImageProcessor, CLIPVisionModel

    processor = CLIPImageProcessor.from_pretrained(tiny.wan / "image_processor")
    assert list(processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    pixels = processor(images=image(300, 200), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)
    encoder = CLIPVisionModel.from_pretrained(tiny.wan / "image_encoder").eval()
    with torch.no_grad():
        hidden = encoder(pixels, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape == (1, 257, 24)


def test_scheduler_config(tiny):
    from diffusers import UniPCMultistepScheduler

    config = UniPCMultistepScheduler.from_pretrained(tiny.wan / "scheduler").config
    assert config.prediction_type == "flow_prediction" and config.use_flow_sigmas
    assert (config.flow_shift, config.solver_order, config.solver_type) == (3.0, 2, "bh2")


def qwen_messages():
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe the subjects."},
                {"type": "image"},
                {"type": "image"},
            ],
        }
    ]


def test_qwen_chat_template_image_tokens_and_forward(tiny):
    # What Qwen2_5_VLProcessor does, done with its two halves: transformers cannot build the
    # processor itself without torchvision (see test_qwen_auto_processor).
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny.qwen)
    image_processor = AutoImageProcessor.from_pretrained(tiny.qwen)
    text = tokenizer.apply_chat_template(qwen_messages(), add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.index("Describe") < text.index("<|vision_start|><|image_pad|><|vision_end|>")
    assert text.count("<|image_pad|>") == 2 and text.endswith("<|im_end|>\n<|im_start|>assistant\n")

    images = image_processor(images=[image(100, 150), image(60, 60, seed=1)], return_tensors="pt")
    counts = [int(grid.prod()) // 4 for grid in images.image_grid_thw]
    pieces = text.split("<|image_pad|>")
    text = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:]))
    inputs = tokenizer([text], return_tensors="pt")
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 1 marks image tokens; without it transformers 5 silently drops the 3-D (MRoPE) positions.
    inputs["mm_token_type_ids"] = (inputs.input_ids == image_pad).int()

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny.qwen).eval()
    assert model.config.image_token_id == image_pad
    assert model.config.text_config.hidden_size == 40
    length = inputs.input_ids.shape[1]
    with torch.no_grad():  # the model itself checks image tokens == vision features
        states = model.model(**inputs, **images).last_hidden_state
        hidden = model(**inputs, **images, output_hidden_states=True).hidden_states[-1]
    assert states.shape == hidden.shape == (1, length, 40)
    assert model.model.rope_deltas is not None and int(model.model.rope_deltas) < 0  # image positions are 2-D


def test_qwen_auto_processor(tiny):
    pytest.importorskip("torchvision", reason="transformers' Qwen2.5-VL processor needs torchvision")
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny.qwen)
    text = processor.apply_chat_template(qwen_messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image(100, 150), image(60, 60, seed=1)], return_tensors="pt")
    ids = inputs.input_ids[0].tolist()
    start, end = processor.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    pads_per_image = [ids[i + 1 :].index(end) for i, token in enumerate(ids) if token == start]
    assert pads_per_image == [int(grid.prod()) // 4 for grid in inputs.image_grid_thw]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny.qwen).eval()
    with torch.no_grad():
        states = model.model(**inputs).last_hidden_state
    assert states.shape == (1, inputs.input_ids.shape[1], 40)


def test_bindweave_loads_strictly_with_the_encoders_widths(tiny):
    from bindweave.model.loading import load_bindweave_transformer

    load_bindweave_transformer(tiny.bindweave, dtype=torch.float32)
    dit = json.loads((tiny.bindweave / "config.json").read_text())
    t5 = json.loads((tiny.wan / "text_encoder" / "config.json").read_text())
    clip = json.loads((tiny.wan / "image_encoder" / "config.json").read_text())
    qwen = json.loads((tiny.qwen / "config.json").read_text())
    assert dit["text_dim"] == t5["d_model"]
    assert dit["image_dim"] == clip["hidden_size"]
    assert dit["mllm_dim"] == qwen["text_config"]["hidden_size"]


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path, capsys):
    again = write_tiny_models(tmp_path / "again", seed=SEED)
    first, second = files(tiny.wan.parent), files(again.wan.parent)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name

    # The command line, over the existing set: another seed replaces it.
    main([str(tmp_path / "again"), "--seed", str(SEED + 1)])
    assert str(again.bindweave) in capsys.readouterr().out
    assert (tmp_path / "again" / MARKER_NAME).read_text().endswith(f"seed={SEED + 1}\n")
    other = files(tmp_path / "again")
    assert other.keys() == first.keys()
    weights = [name for name in first if name.suffix == ".safetensors"]
    assert len(weights) == 5  # vae, text_encoder, image_encoder, BindWeave, Qwen
    for name in weights:
        assert first[name].read_bytes() != other[name].read_bytes(), name


def test_second_call_does_not_rewrite(tiny):
    root = tiny.wan.parent
    before = {name: path.stat().st_mtime_ns for name, path in files(root).items()}
    assert write_tiny_models(root, seed=SEED) == tiny
    assert {name: path.stat().st_mtime_ns for name, path in files(root).items()} == before
    assert (root / MARKER_NAME).read_text().endswith(f"seed={SEED}\n")
    names = {tiny.wan.name, tiny.bindweave.name, tiny.qwen.name, MARKER_NAME, LOCK_NAME}
    assert {path.name for path in root.iterdir()} == names  # no staging folder left behind


def test_refuses_to_overwrite_folders_it_did_not_write(tmp_path):
    (tmp_path / "Qwen2.5-VL-7B-Instruct").mkdir()
    with pytest.raises(BindWeaveInputError, match="Qwen2.5-VL-7B-Instruct"):
        write_tiny_models(tmp_path)
