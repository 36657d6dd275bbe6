"""The shared Qwen2.5-VL loader and input builder (bindweave/encoders/qwen.py), SPEC §3."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as transformers_smart_resize

from bindweave.io.inputs import load_reference_image
from bindweave.errors import BindWeaveInputError
from bindweave.encoders.qwen import (build_inputs, build_messages, image_token_counts, load_qwen,
                                     prefill_hidden_states, prescale_references, resize_for_vision, smart_resize)
from bindweave.settings.qwen import QwenSettings

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "opens2v" / "Images"
needs_fixtures = pytest.mark.skipif(not IMAGES.is_dir(),
                                    reason=f"real OpenS2V images not found at {IMAGES} (../shared)")


@pytest.fixture(scope="session")
def qwen(tiny_models):
    folder = tiny_models.qwen
    return load_qwen(QwenSettings(path=str(folder), device="cpu"))


def solid(width, height, colour=(200, 40, 40)):
    return Image.new("RGB", (width, height), colour)


# ---- image preprocessing ----------------------------------------------------------------------


def test_released_processor_settings(qwen):
    processor = qwen.image_processor
    assert (processor.patch_size, processor.merge_size, processor.temporal_patch_size) == (14, 2, 2)
    assert (processor.size.shortest_edge, processor.size.longest_edge) == (3136, 12845056)


@needs_fixtures
@pytest.mark.parametrize("name, scaled_size, grid, tokens", [
    ("man.png", (501, 625), [1, 44, 36], 396),  # 668x834 x0.75; the official L = 526 has these 396
    ("human.jpg", (240, 322), [1, 24, 18], 108),
    ("dog.jpg", (1460, 973), [1, 70, 104], 1820),  # 4868x3244 > 720x1280: the x0.3 branch
    ("school.jpg", (360, 240), [1, 18, 26], 117),
    ("woman1.jpg", (307, 460), [1, 32, 22], 176),
    ("woman2.jpg", (307, 460), [1, 32, 22], 176),
])
def test_fixture_image_tokens(qwen, name, scaled_size, grid, tokens):
    [scaled] = prescale_references([load_reference_image(IMAGES / name)])
    assert scaled.size == scaled_size
    inputs = build_inputs(qwen, "a prompt", [scaled])
    assert inputs["image_grid_thw"].tolist() == [grid]
    assert image_token_counts(qwen, inputs) == [tokens]
    assert int((inputs["input_ids"] == qwen.model.config.image_token_id).sum()) == tokens


def test_prescale_rule_and_first_four():
    at_limit = solid(1280, 720)  # exactly 720x1280 pixels: not "more than", so x0.75
    over = solid(1281, 720)
    images = [at_limit, over, solid(101, 51), solid(40, 40), solid(60, 60)]
    assert [image.size for image in prescale_references(images)] == [(960, 540), (384, 216), (75, 38), (30, 30)]


def test_prescale_uses_pil_default_filter():
    image = Image.effect_noise((333, 222), 60).convert("RGB")
    [scaled] = prescale_references([image])
    assert scaled.tobytes() == image.resize((249, 166)).tobytes()


@pytest.mark.parametrize("height, width", [(625, 501), (973, 1460), (28, 28), (60, 4000), (5000, 5000), (30, 9)])
def test_smart_resize_matches_transformers_where_they_agree(height, width):
    # transformers' copy and qwen-vl-utils' agree unless a side rounds to 0 (see below).
    assert smart_resize(height, width) == transformers_smart_resize(height, width, 28, 3136, 12845056)


def test_smart_resize_keeps_thin_sides_like_qwen_vl_utils():
    # qwen-vl-utils rounds each side to at least 28 first: 10x1000 stays one row of 36 patches,
    # where transformers' copy would round the height to 0 and upscale to 28x560.
    assert smart_resize(10, 1000) == (28, 1008)
    assert resize_for_vision(solid(1000, 10)).size == (1008, 28)


def test_smart_resize_refuses_extreme_aspect_ratio():
    with pytest.raises(BindWeaveInputError, match="201x1"):
        smart_resize(1, 201)


# ---- chat template and token sequence -----------------------------------------------------------


def test_messages_put_text_before_images():
    images = [solid(30, 30), solid(40, 40)]
    [message] = build_messages("a man", images)
    assert message["role"] == "user"
    assert [part["type"] for part in message["content"]] == ["text", "image", "image"]
    assert message["content"][0]["text"] == "a man"
    assert [part["image"] for part in message["content"][1:]] == images


def test_token_sequence_text_then_images_then_assistant_prefix(qwen):
    tokenizer = qwen.tokenizer
    images = [solid(56, 84), solid(112, 56)]
    inputs = build_inputs(qwen, "a man walks his dog", images)
    ids = inputs["input_ids"][0].tolist()

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    expected = (encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
                + encode("a man walks his dog"))
    for tokens in image_token_counts(qwen, inputs):
        expected += encode("<|vision_start|>") + encode("<|image_pad|>") * tokens + encode("<|vision_end|>")
    expected += encode("<|im_end|>\n<|im_start|>assistant\n")
    assert ids == expected
    assert image_token_counts(qwen, inputs) == [2 * 3, 4 * 2]  # (84/28)x(56/28) merged patches, (56/28)x(112/28)
    image_mask = inputs["input_ids"] == qwen.model.config.image_token_id
    assert torch.equal(inputs["mm_token_type_ids"], image_mask.long())
    assert torch.equal(inputs["attention_mask"], torch.ones_like(inputs["input_ids"]))


# ---- prefill ----------------------------------------------------------------------------------


def test_prefill_is_last_hidden_state_after_final_norm(qwen):
    model = qwen.model
    inputs = build_inputs(qwen, "a man walks his dog", [solid(84, 56), solid(56, 56, (10, 200, 30))])
    norm_inputs = []
    final_norm = model.model.language_model.norm
    hook = final_norm.register_forward_hook(lambda module, args, output: norm_inputs.append(args[0]))
    try:
        states = prefill_hidden_states(model, inputs)
    finally:
        hook.remove()
    length = inputs["input_ids"].shape[1]
    assert states.shape == (1, length, qwen.hidden_size)

    # An independent call: the full model with explicit 3-D positions from get_rope_index.
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              inputs["image_grid_thw"])
    with torch.no_grad():
        full = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                     image_grid_thw=inputs["image_grid_thw"], position_ids=positions, output_hidden_states=True)
    torch.testing.assert_close(states, full.hidden_states[-1], rtol=0, atol=0)
    # After the final norm, not the residual stream going into it; not the LM logits either.
    [pre_norm] = norm_inputs
    assert not torch.allclose(states, pre_norm)
    torch.testing.assert_close(states, final_norm(pre_norm))
    assert full.logits.shape[-1] == model.config.text_config.vocab_size != states.shape[-1]


def test_prefill_uses_3d_multimodal_positions(qwen):
    inputs = build_inputs(qwen, "a dog", [solid(112, 56)])
    states = prefill_hidden_states(qwen.model, inputs)
    # The 3-D positions of a 4x2 merged grid end 8 - 4 = 4 before the 1-D ones.
    assert qwen.model.model.rope_deltas.tolist() == [[-4]]
    # Without mm_token_type_ids transformers 5 silently falls back to 1-D positions.
    one_d = prefill_hidden_states(qwen.model, {k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
    assert not torch.allclose(states, one_d)


def test_load_refuses_incomplete_weights(tmp_path, qwen):
    folder = tmp_path / "qwen"
    shutil.copytree(qwen.identity["folder"], folder)
    weights = load_file(folder / "model.safetensors")
    dropped = next(key for key in weights if key.endswith("norm.weight"))
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BindWeaveInputError, match="missing keys"):
        load_qwen(QwenSettings(path=str(folder), device="cpu"))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BindWeaveInputError, match="does not exist"):
        load_qwen(QwenSettings(path=str(tmp_path / "nowhere" / "qwen"), device="cpu"))


def test_dtype_auto_is_float32_on_cpu_bfloat16_on_gpu():
    settings = QwenSettings()
    assert settings.torch_dtype(torch.device("cpu")) == torch.float32
    assert settings.torch_dtype(torch.device("cuda", 0)) == torch.bfloat16


def test_chat_template_is_the_processors(tmp_path, qwen):
    # Released folders keep the processor's template in chat_template.json (older) or .jinja.
    folder = tmp_path / "qwen"
    shutil.copytree(qwen.identity["folder"], folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    marked = template.replace("You are a helpful assistant.", "You are the processor's template.")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": marked}))
    loaded = load_qwen(QwenSettings(path=str(folder), device="cpu"))
    ids = build_inputs(loaded, "a dog", [solid(56, 56)])["input_ids"][0]
    assert "You are the processor's template." in loaded.tokenizer.decode(ids)
