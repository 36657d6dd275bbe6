"""Reading inputs: meta JSON, reference images, hidden states (bindweave/io/inputs.py)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from bindweave.io.inputs import (
    Sample,
    load_hidden_states,
    load_reference_image,
    load_sample_hidden_states,
    read_meta,
    sample_id_problem,
    save_hidden_states,
)
from bindweave.errors import BindWeaveInputError

from conftest import OPENS2V, needs_opens2v


def write_meta(folder: Path, meta: object) -> Path:
    path = folder / "meta.json"
    path.write_text(json.dumps(meta))
    return path


# --- meta JSON ------------------------------------------------------------------------------


@needs_opens2v
@pytest.mark.parametrize("image_root", [None, OPENS2V])
def test_read_meta_official_cases(image_root):
    samples = read_meta(OPENS2V / "test_case.json", image_root=image_root)

    assert [s.sample_id for s in samples] == ["faceobj_1", "multihuman_14", "singleface_1"]
    faceobj = samples[0]
    assert faceobj.prompt == "a man playing with his dog in front of the house"
    assert faceobj.image_paths == tuple(OPENS2V / "Images" / n
                                        for n in ("human.jpg", "dog.jpg", "school.jpg"))
    assert all(p.is_file() for s in samples for p in s.image_paths)
    assert faceobj.fields["synthesis_flag"] == "Wrong"
    assert faceobj.fields["class_label"] == ["Man", "Dog", "School"]
    assert faceobj.hidden_states_path is None and faceobj.seed is None
    assert samples[2].prompt.startswith("The video features a young man")


@needs_opens2v
def test_read_meta_hidden_state_paths_resolve_against_meta_folder():
    samples = read_meta(OPENS2V / "test_case_with_features.json")
    assert samples[0].hidden_states_path == (
        OPENS2V / "s2v/OpenS2V-Eval/hidden_states/faceobj_1_hidden_states.pt")


def test_read_meta_more_than_four_references_warns_and_keeps_first_four(tmp_path):
    names = [f"ref{i}.png" for i in range(6)]
    meta = write_meta(tmp_path, {"crowd": {"img_paths": names, "prompt": "p", "seed": 7}})

    with pytest.warns(UserWarning, match="crowd") as record:
        (sample,) = read_meta(meta)

    message = str(record[0].message)
    assert "ref4.png" in message and "ref5.png" in message and "ref3.png" not in message
    assert sample.image_paths == tuple(tmp_path / n for n in names[:4])
    assert sample.seed == 7


def test_read_meta_keeps_absolute_paths_and_does_not_open_images(tmp_path):
    meta = write_meta(tmp_path, {"a": {"img_paths": ["/nowhere/x.png"], "prompt": "p",
                                       "hidden_states_path": "/hs/a.safetensors"}})
    (sample,) = read_meta(meta, image_root=tmp_path / "images")
    assert sample == Sample("a", "p", (Path("/nowhere/x.png"),), Path("/hs/a.safetensors"),
                            None, None, {"img_paths": ["/nowhere/x.png"], "prompt": "p",
                                         "hidden_states_path": "/hs/a.safetensors"})


GOOD = {"img_paths": ["a.png"], "prompt": "a cat"}


@pytest.mark.parametrize("content, expected", [
    ('{"a": {"prompt": "x",\n "img_paths": ["a.png"],}}', "line 2"),
    (json.dumps([GOOD]), "top level is a list"),
    ("{}", "no samples"),
    (json.dumps({"s1": ["a.png"]}), "'s1'"),
    (json.dumps({"s1": {"img_paths": ["a.png"]}}), '"prompt"'),
    (json.dumps({"s1": {"img_paths": ["a.png"], "prompt": "  "}}), '"prompt"'),
    (json.dumps({"s1": {"prompt": "x"}}), '"img_paths"'),
    (json.dumps({"s1": {"prompt": "x", "img_paths": []}}), '"img_paths"'),
    (json.dumps({"s1": {"prompt": "x", "img_paths": "a.png"}}), '"img_paths"'),
    (json.dumps({"s1": {"prompt": "x", "img_paths": ["a.png", 3]}}), '"img_paths"'),
    (json.dumps({"s1": {**GOOD, "seed": "42"}}), '"seed"'),
    (json.dumps({"s1": {**GOOD, "seed": 1.5}}), '"seed"'),
    (json.dumps({"s1": {**GOOD, "hidden_states_path": 3}}), '"hidden_states_path"'),
])
def test_read_meta_bad_input(tmp_path, content, expected):
    meta = tmp_path / "meta.json"
    meta.write_text(content)
    with pytest.raises(BindWeaveInputError) as info:
        read_meta(meta)
    assert str(meta) in str(info.value) and expected in str(info.value)


def test_read_meta_missing_file(tmp_path):
    with pytest.raises(BindWeaveInputError, match="does not exist") as info:
        read_meta(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)


# Sample ids name output files in every stage (<id>.mp4, hidden_states/<id>.safetensors, ...).
@pytest.mark.parametrize("sample_id, rule", [
    ("", "is empty"),
    ("../../escaped_sample", "path separator '/'"),
    ("a/b", "path separator '/'"),
    ("/abs", "path separator '/'"),
    ("a\\b", "path separator '\\\\'"),
    (".", "names a folder"),
    ("..", "names a folder"),
    (".hidden", "starts with '.'"),
    (".a_bad.123.tmp.mp4", "starts with '.'"),
    ("a\x00b", "control character U+0000 (NUL)"),
    ("a\nb", "control character U+000A"),
    ("a\tb", "control character U+0009"),
    ("a\x7fb", "control character U+007F"),
    ("a\u200bb", "format character U+200B"),
    ("a\u202eb", "format character U+202E"),
    ("a\u2028b", "line separator character U+2028"),
    ("a\ud800b", "surrogate character U+D800"),
    (" lead", "leading or trailing whitespace"),
    ("trail ", "leading or trailing whitespace"),
    ("trail\u3000", "leading or trailing whitespace"),
    ("x" * 201, "201 bytes long in UTF-8; the limit is 200"),
    ("é" * 101, "202 bytes long in UTF-8; the limit is 200"),
], ids=["empty", "escape", "slash", "absolute", "backslash", "dot", "dotdot", "hidden", "temp-name", "nul",
        "newline", "tab", "del", "zero-width", "bidi-override", "line-separator", "surrogate", "leading-space",
        "trailing-space", "trailing-ideographic-space", "long-ascii", "long-utf8"])
def test_read_meta_refuses_unsafe_sample_ids(tmp_path, sample_id, rule):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({sample_id: GOOD}))
    with pytest.raises(BindWeaveInputError) as info:
        read_meta(meta)
    message = str(info.value)
    assert message.startswith(f"Meta file {meta}, sample {sample_id!r}: ")
    assert rule in message and "rename the key in the meta JSON" in message, message
    assert "\n" not in message  # one line, whatever the id holds
    assert sample_id_problem(sample_id) is not None


def test_unsafe_sample_id_message_suggests_a_safe_name(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"../../escaped_sample": GOOD}))
    with pytest.raises(BindWeaveInputError) as info:
        read_meta(meta)
    assert str(info.value) == (
        f"Meta file {meta}, sample '../../escaped_sample': the sample id '../../escaped_sample' contains the "
        f"path separator '/'. The id names the sample's output files (<id>.mp4, <id>.json, "
        f"hidden_states/<id>.safetensors), so it must be one plain file name: rename the key in the meta "
        f"JSON, e.g. to 'escaped_sample'.")


@pytest.mark.parametrize("sample_id", [
    "two words inside", "dash-and_under.score", "Ünïcödé 文字 ελληνικά", "x" * 200, "é" * 100, "a..b", "1",
    "emoji 🎬", "name.mp4",
])
def test_read_meta_accepts_unusual_but_safe_sample_ids(tmp_path, sample_id):
    meta = write_meta(tmp_path, {sample_id: GOOD})
    (sample,) = read_meta(meta)
    assert sample.sample_id == sample_id and sample_id_problem(sample_id) is None


def test_read_meta_refuses_ids_that_clash_on_a_case_insensitive_file_system(tmp_path):
    decomposed = "Cafe\u0301"  # NFD of "Café": the same name on a normalizing file system
    meta = write_meta(tmp_path, {"a": GOOD, "A": GOOD, "Café": GOOD, decomposed: GOOD, "b": GOOD})
    with pytest.raises(BindWeaveInputError) as info:
        read_meta(meta)
    message = str(info.value)
    assert str(meta) in message and "'A' and 'a'" in message and "case-insensitive" in message, message

    invalid = {}
    samples = read_meta(meta, invalid=invalid)
    assert [sample.sample_id for sample in samples] == ["b"]
    assert sorted(invalid) == sorted(["a", "A", "Café", decomposed])
    assert "'A' and 'a'" in invalid["a"] and "'A' and 'a'" in invalid["A"]
    assert repr("Café") in invalid[decomposed] and repr(decomposed) in invalid["Café"]


def test_read_meta_collects_unsafe_ids_per_sample_and_parses_the_good_ones(tmp_path):
    meta = write_meta(tmp_path, {"../../escaped_sample": GOOD, ".hidden": GOOD, "good one": GOOD,
                                 "bad\x00": GOOD, "also-good": {**GOOD, "seed": 3}, "x" * 201: GOOD})
    invalid = {}
    samples = read_meta(meta, invalid=invalid)
    assert [(sample.sample_id, sample.seed) for sample in samples] == [("also-good", 3), ("good one", None)]
    assert sorted(invalid) == sorted(["../../escaped_sample", ".hidden", "bad\x00", "x" * 201])
    for sample_id, message in invalid.items():
        assert message.startswith(f"Meta file {meta}, sample {sample_id!r}: ") and "rename the key" in message


# --- reference images -----------------------------------------------------------------------


def noise_jpeg(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def make_missing(folder):
    return folder / "missing.png"


def make_empty(folder):
    path = folder / "empty.jpg"
    path.write_bytes(b"")
    return path


def make_truncated(folder):
    whole = noise_jpeg(folder / "whole.jpg").read_bytes()
    path = folder / "cut.jpg"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def make_text_as_png(folder):
    path = folder / "notes.png"
    path.write_text("not an image")
    return path


def make_directory(folder):
    path = folder / "dir.png"
    path.mkdir()
    return path


@pytest.mark.parametrize("make, expected", [
    (make_missing, "does not exist"),
    (make_empty, "0 bytes"),
    (make_truncated, "truncated"),
    (make_text_as_png, "not an image"),
    (make_directory, "does not exist"),
])
def test_load_reference_image_bad_input(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(BindWeaveInputError) as info:
        load_reference_image(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_load_reference_image_refuses_too_many_pixels(tmp_path):
    path = noise_jpeg(tmp_path / "big.jpg")
    with pytest.raises(BindWeaveInputError, match="too large .96x64") as info:
        load_reference_image(path, max_pixels=96 * 64 - 1)
    assert str(path) in str(info.value)
    assert load_reference_image(path, max_pixels=96 * 64).size == (96, 64)


def test_load_reference_image_reports_pil_decompression_bomb(tmp_path, monkeypatch):
    path = noise_jpeg(tmp_path / "bomb.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BindWeaveInputError, match="too large") as info:
        load_reference_image(path)
    assert str(path) in str(info.value)


def saved(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def test_load_reference_image_cmyk_jpeg(tmp_path):
    path = saved(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    image = load_reference_image(path)
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image).astype(int) - [255, 0, 0]).max() <= 3


def test_load_reference_image_16_bit_png_is_scaled_not_clipped(tmp_path):
    samples = np.array([[0, 100 * 257], [128 * 257, 65535]], dtype=np.uint16)
    path = saved(Image.fromarray(samples), tmp_path / "deep.png")
    with Image.open(path) as image:
        assert image.mode == "I;16"
    pixels = np.asarray(load_reference_image(path))
    assert pixels.shape == (2, 2, 3)
    np.testing.assert_array_equal(pixels[..., 0], [[0, 100], [128, 255]])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_load_reference_image_alpha_becomes_black(tmp_path):
    rgba = np.array([[[255, 255, 255, 0], [200, 100, 50, 255], [200, 100, 50, 128]]],
                    dtype=np.uint8)
    path = saved(Image.fromarray(rgba), tmp_path / "alpha.png")
    pixels = np.asarray(load_reference_image(path)).astype(int)
    np.testing.assert_array_equal(pixels[0, :2], [[0, 0, 0], [200, 100, 50]])
    assert np.abs(pixels[0, 2] - [100, 50, 25]).max() <= 1


def test_load_reference_image_palette_and_grayscale(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    path = saved(palette, tmp_path / "palette.png")
    np.testing.assert_array_equal(np.asarray(load_reference_image(path))[0, 0], [10, 200, 30])

    path = saved(palette, tmp_path / "palette_transparent.png", transparency=1)
    np.testing.assert_array_equal(np.asarray(load_reference_image(path))[0, 0], [0, 0, 0])

    path = saved(Image.new("L", (4, 4), 77), tmp_path / "gray.png")
    np.testing.assert_array_equal(np.asarray(load_reference_image(path))[0, 0], [77, 77, 77])


@needs_opens2v
def test_load_reference_image_official_fixture():
    image = load_reference_image(OPENS2V / "Images" / "man.png")
    assert image.mode == "RGB" and image.size == (668, 834)


# --- hidden states --------------------------------------------------------------------------


@needs_opens2v
def test_official_pt_hidden_states_load(tmp_path):
    folder = OPENS2V / "hidden_states"
    positive = load_hidden_states(folder / "singleface_hidden_states.pt")
    negative = load_hidden_states(folder / "singleface_hidden_states_negative.pt", negative=True)
    assert positive.shape == (1, 526, 3584) and negative.shape == (1, 532, 3584)
    assert positive.dtype == negative.dtype == torch.bfloat16

    meta = write_meta(tmp_path, {"singleface_1": {
        "img_paths": ["man.png"], "prompt": "p",
        "hidden_states_path": str(folder / "singleface_hidden_states.pt"),
        "hidden_states_path_negative": str(folder / "singleface_hidden_states_negative.pt")}})
    sample_positive, sample_negative = load_sample_hidden_states(read_meta(meta)[0])
    assert torch.equal(sample_positive, positive) and torch.equal(sample_negative, negative)


def test_safetensors_round_trip(tmp_path):
    positive = torch.randn(1, 5, 8, dtype=torch.bfloat16)
    negative = torch.randn(7, 8, dtype=torch.bfloat16)
    path = tmp_path / "hs" / "case_hidden_states.safetensors"
    save_hidden_states(path, positive, negative, {"model": "Qwen/Qwen2.5-VL-7B-Instruct"})

    assert sorted(os.listdir(path.parent)) == [path.name]
    with safe_open(path, framework="pt") as file:
        assert file.metadata() == {"model": "Qwen/Qwen2.5-VL-7B-Instruct"}
    assert torch.equal(load_hidden_states(path, hidden_dim=8), positive)
    assert torch.equal(load_hidden_states(path, negative=True, hidden_dim=8), negative[None])

    meta = write_meta(tmp_path, {"case": {"img_paths": ["a.png"], "prompt": "p",
                                          "hidden_states_path": "hs/" + path.name}})
    sample_positive, sample_negative = load_sample_hidden_states(read_meta(meta)[0], hidden_dim=8)
    assert torch.equal(sample_positive, positive) and torch.equal(sample_negative, negative[None])


class NotATensor:
    """Pickled by reference, so weights_only loading must refuse it."""


def save_pt(value):
    def make(folder):
        path = folder / "states.pt"
        torch.save(value, path)
        return path
    return make


def make_safetensors_without_negative(folder):
    from safetensors.torch import save_file
    path = folder / "states.safetensors"
    save_file({"positive": torch.zeros(1, 3, 16)}, path)
    return path


def make_garbage_safetensors(folder):
    path = folder / "states.safetensors"
    path.write_bytes(b"\x00" * 64)
    return path


@pytest.mark.parametrize("make, expected", [
    (make_missing, "does not exist"),
    (save_pt(torch.zeros(1, 3, 15)), "[1, 3, 15]"),
    (save_pt(torch.zeros(1, 1, 3, 16)), "[1, 1, 3, 16]"),
    (save_pt(torch.zeros(2, 3, 16)), "[2, 3, 16]"),
    (save_pt(torch.zeros(0, 16)), "L >= 1"),
    (save_pt(torch.full((3, 16), float("nan"))), "NaN"),
    (save_pt(torch.zeros(3, 16, dtype=torch.int64)), "torch.int64"),
    (save_pt(torch.zeros(3, 16, dtype=torch.float64)), "torch.float64"),
    (save_pt({"states": torch.zeros(3, 16)}), "holds a dict"),
    (save_pt({"states": NotATensor()}), "never unpickled"),
    (make_text_as_png, "safe loader"),
    (make_safetensors_without_negative, "no tensor 'negative'"),
    (make_garbage_safetensors, "not a readable safetensors"),
])
def test_load_hidden_states_bad_input(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(BindWeaveInputError) as info:
        load_hidden_states(path, negative=True, hidden_dim=16)
    assert str(path) in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("entry, field", [
    ({}, "hidden_states_path"),
    ({"hidden_states_path": "a_hidden_states.pt"}, "hidden_states_path_negative"),
])
def test_load_sample_hidden_states_missing_path(tmp_path, entry, field):
    meta = write_meta(tmp_path, {"case_7": {"img_paths": ["a.png"], "prompt": "p", **entry}})
    with pytest.raises(BindWeaveInputError) as info:
        load_sample_hidden_states(read_meta(meta)[0])
    message = str(info.value)
    assert "'case_7'" in message and f'"{field}"' in message and "launch/extract.py" in message


@needs_opens2v
def test_official_states_with_a_tiny_dit_say_why_they_do_not_fit():
    """The official 3584-wide states against the tiny DiT (mllm_dim 40): the message says so."""
    with pytest.raises(BindWeaveInputError) as caught:
        load_hidden_states(OPENS2V / "hidden_states" / "singleface_hidden_states.pt", hidden_dim=40)
    message = str(caught.value)
    assert "These are Qwen2.5-VL-7B states (3584 wide)" in message and "mllm_dim" in message
    assert "model=bindweave_14b" in message
