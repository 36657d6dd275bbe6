"""Strict checkpoint loading: the tiny DiT folder loads through the real code path; broken ones fail clearly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bindweave import BindWeaveTransformer
from bindweave.io.checkpoint import read_config, resolve_folder
from bindweave.model.loading import load_bindweave_transformer
from bindweave.errors import BindWeaveInputError
from bindweave.model.transformer import BINDWEAVE_14B_CONFIG

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def broken_copy(tiny_dit_folder, tmp_path):
    """A copy of the tiny DiT whose state dict a test edits."""
    folder = tmp_path / "BindWeave"
    shutil.copytree(tiny_dit_folder, folder)

    def edit(change):
        state = load_file(folder / WEIGHTS)
        change(state)
        save_file(state, folder / WEIGHTS)
        return folder

    return edit


def test_tiny_checkpoint_loads_exactly_in_bf16(tiny_dit_folder):
    model = load_bindweave_transformer(tiny_dit_folder, dtype=torch.bfloat16)
    stored = load_file(tiny_dit_folder / WEIGHTS)
    loaded = model.state_dict()
    assert set(loaded) == set(stored)
    for key, tensor in stored.items():
        fp32_module = any(m in key.split(".") for m in ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"))
        assert loaded[key].dtype == (torch.float32 if fp32_module else torch.bfloat16), key
        torch.testing.assert_close(loaded[key].float(), tensor.to(loaded[key].dtype).float(), rtol=0, atol=0)
    fresh = BindWeaveTransformer(**dict(model.config)).rope  # rope tables are computed, not loaded
    torch.testing.assert_close(model.rope.freqs_cos, fresh.freqs_cos, rtol=0, atol=0)


def test_sharded_index_checkpoint_loads(tiny_dit_folder, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(tiny_dit_folder / "config.json", folder)
    state = load_file(tiny_dit_folder / WEIGHTS)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, folder / name)
    index = {"weight_map": {k: name for name, shard_keys in shards.items() for k in shard_keys}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    model = load_bindweave_transformer(folder, dtype=torch.float32)
    torch.testing.assert_close(model.state_dict()["proj_out.weight"], state["proj_out.weight"])


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.__setitem__("blocks.0.attn1.to_qq.weight", s.pop("blocks.0.attn1.to_q.weight")),
         ["blocks.0.attn1.to_q.weight", "blocks.0.attn1.to_qq.weight"]),
        (lambda s: s.__setitem__("proj_out.weight", s["proj_out.weight"][:-1]), ["proj_out.weight"]),
        (lambda s: [s.pop(k) for k in list(s) if "text_projector" in k],
         ["condition_embedder.text_projector.linear_1.weight"]),
        (lambda s: s.__setitem__("proj_out.bias", s["proj_out.bias"].to(torch.int32)), ["proj_out.bias", "I32"]),
    ],
    ids=["renamed-key", "wrong-shape", "projector-missing", "int-dtype"],
)
def test_broken_checkpoint_names_the_key_and_folder(broken_copy, change, named):
    folder = broken_copy(change)
    with pytest.raises(BindWeaveInputError) as error:
        load_bindweave_transformer(folder)
    message = str(error.value)
    assert str(folder) in message
    for text in named:
        assert text in message


def test_folder_without_safetensors_or_with_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BindWeaveInputError, match="no \\*.safetensors"):
        load_bindweave_transformer(tmp_path)
    (tmp_path / "x.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(BindWeaveInputError, match="gone.safetensors"):
        load_bindweave_transformer(tmp_path)


def test_bare_safetensors_folder_uses_the_14b_defaults(tiny_dit_folder, tmp_path):
    """The official scripts read a folder of safetensors only: it gets the 14B config, so the tiny
    weights there are reported as wrong shapes rather than silently loaded."""
    shutil.copy(tiny_dit_folder / WEIGHTS, tmp_path)
    config = read_config(tmp_path, BindWeaveTransformer, BINDWEAVE_14B_CONFIG)
    assert config == BINDWEAVE_14B_CONFIG
    with pytest.raises(BindWeaveInputError, match="wrong shapes"):
        load_bindweave_transformer(tmp_path)


def test_missing_path_that_is_not_a_repo_id(tmp_path):
    with pytest.raises(BindWeaveInputError, match="does not exist"):
        resolve_folder(tmp_path / "nope")


def test_repo_id_offline_cache_miss_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BindWeaveInputError, match="ByteDance/BindWeave"):
        resolve_folder("ByteDance/BindWeave")


def test_a_missing_local_folder_is_not_taken_for_a_repo_id(tmp_path, monkeypatch):
    """`weights/BindWeave` with `weights/` here: a local path to download to, not a hub repo id."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    with pytest.raises(BindWeaveInputError, match=r"model folder weights/BindWeave does not exist .*--local-dir "
                                                  r"weights/BindWeave"):
        resolve_folder("weights/BindWeave")


def test_rows_read_straight_into_a_destination_equal_the_stacked_copy(tmp_path):
    """The offload loader's path (``out=``): each tensor's rows land in their slice of the
    destination, the same values as the concatenated copy; another dtype is converted."""
    from bindweave.io.checkpoint import index_checkpoint, read_stacked_rows

    save_file({"q": torch.randn(5, 3).bfloat16(), "k": torch.randn(4, 3).bfloat16()}, tmp_path / "m.safetensors")
    tensors = index_checkpoint(tmp_path)
    expected = read_stacked_rows(tensors, ["q", "k"], 2, 8)
    assert torch.equal(expected, torch.cat([load_file(tmp_path / "m.safetensors")[key] for key in "qk"])[2:8])
    same_dtype = torch.full((6, 3), 7.0, dtype=torch.bfloat16)
    assert read_stacked_rows(tensors, ["q", "k"], 2, 8, out=same_dtype) is same_dtype
    assert torch.equal(same_dtype, expected)
    converted = torch.zeros(6, 3)
    read_stacked_rows(tensors, ["q", "k"], 2, 8, out=converted)
    assert torch.equal(converted, expected.float())


def test_a_file_that_ends_inside_a_tensor_is_named(tmp_path):
    from bindweave.io.checkpoint import read_rows

    save_file({"w": torch.randn(64, 8)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-100])
    with pytest.raises(BindWeaveInputError, match="m.safetensors ends inside tensor w.*re-download"):
        read_rows(tmp_path / "m.safetensors", "w", 0, 64, out=torch.empty(64, 8))
