"""LoRA merging (bindweave/model/lora.py): every key layout merges to exactly W + strength * alpha / rank
* B @ A (and the full deltas), computed here independently; stacked files add; the resident, host-buffer
and FSDP loaders give the same weights; a LoRA that does not fit is refused from the headers alone."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bindweave.errors import BindWeaveInputError
from bindweave.model.loading import (load_bindweave_to_host_buffer, load_bindweave_transformer,
                                     parameter_shapes)
from bindweave.model.lora import LoraMerge
from bindweave.model.speed import fuse_projections
from bindweave.settings.lora import LoraSettings

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"
RANK = 4

# (the DiT's module in diffusers' names, the same module in original Wan names): a self-attention and
# an image K projection, an FFN linear of another shape, a linear outside the blocks, the patch conv.
MODULES = [("blocks.0.attn1.to_q", "blocks.0.self_attn.q"),
           ("blocks.1.attn2.add_k_proj", "blocks.1.cross_attn.k_img"),
           ("blocks.1.ffn.net.0.proj", "blocks.1.ffn.0"),
           ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
           ("patch_embedding", "patch_embedding")]
# Full deltas in original Wan names (LightX2V's I2V distill LoRA has these kinds) -> the DiT's parameter.
FULL_DELTAS = {"blocks.0.norm3.diff": "blocks.0.norm2.weight", "blocks.0.norm3.diff_b": "blocks.0.norm2.bias",
               "blocks.1.cross_attn.k_img.diff_b": "blocks.1.attn2.add_k_proj.bias",
               "blocks.1.cross_attn.norm_k_img.diff": "blocks.1.attn2.norm_added_k.weight",
               "blocks.0.diff_m": "blocks.0.scale_shift_table"}
# layout -> (the module's key stem from (diffusers, original) names, A ending, B ending, with alpha, with diffs)
LAYOUTS = {
    "wan_down_up_alpha": (lambda d, o: f"diffusion_model.{o}", "lora_down.weight", "lora_up.weight", True, True),
    "wan_A_B": (lambda d, o: f"diffusion_model.{o}", "lora_A.weight", "lora_B.weight", False, True),
    "wan_unprefixed": (lambda d, o: o, "lora_down.weight", "lora_up.weight", True, True),
    "diffusers": (lambda d, o: f"transformer.{d}", "lora_A.weight", "lora_B.weight", False, False),
    "peft_alpha": (lambda d, o: f"base_model.model.{d}", "lora_A.weight", "lora_B.weight", True, False),
    "musubi": (lambda d, o: "lora_unet_" + o.replace(".", "_"), "lora_down.weight", "lora_up.weight", True, False),
}


@pytest.fixture(scope="module")
def shapes(tiny_dit_folder):
    return parameter_shapes(tiny_dit_folder)


def write_lora(path: Path, layout: str, shapes, seed: int, dtype=torch.bfloat16, strength: float = 1.0) -> dict:
    """A random LoRA in ``layout``; returns what it adds to each parameter, computed from its tensors."""
    stem, down_end, up_end, with_alpha, with_diffs = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for diffusers_name, original_name in MODULES:
        shape = shapes[f"{diffusers_name}.weight"]
        down = torch.randn(RANK, *shape[1:], generator=generator).to(dtype)
        up = torch.randn(shape[0], RANK, *[1] * (len(shape) - 2), generator=generator).to(dtype)
        key = stem(diffusers_name, original_name)
        tensors[f"{key}.{down_end}"], tensors[f"{key}.{up_end}"] = down, up
        scale = 1.0
        if with_alpha:
            alpha = float(RANK + seed % 3)
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
            scale = alpha / RANK
        product = (up.float().flatten(1) @ down.float().flatten(1)).reshape(shape)
        deltas[f"{diffusers_name}.weight"] = (strength * scale) * product
    if layout == "diffusers":  # PEFT's bias of a pair: scaled as the pair
        bias = torch.randn(shapes["blocks.0.attn1.to_q.bias"], generator=generator).to(dtype)
        tensors["transformer.blocks.0.attn1.to_q.lora_B.bias"] = bias
        deltas["blocks.0.attn1.to_q.bias"] = strength * bias.float()
    if with_diffs:
        prefix = stem("", "")
        for key, name in FULL_DELTAS.items():
            diff = torch.randn(shapes[name], generator=generator).to(dtype)
            tensors[prefix + key] = diff
            deltas[name] = strength * diff.float()
    save_file(tensors, path)
    return deltas


def merge_of(*files: tuple[Path, float], shapes) -> LoraMerge:
    return LoraMerge.from_settings([LoraSettings(str(path), strength) for path, strength in files], shapes)


def assert_merged(loaded: dict, stored: dict, *deltas: dict) -> None:
    """Each parameter is the stored one plus the deltas (float32 rounding: one GEMM adds B @ A into
    the rows); the parameters no delta names are the stored ones exactly."""
    for name, tensor in loaded.items():
        expected = stored[name].clone()
        for delta in deltas:
            expected += delta.get(name, 0)
        if any(name in delta for delta in deltas):
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(tensor, expected), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_merges_to_w_plus_strength_times_scale_times_b_a(layout, tiny_dit_folder, shapes, tmp_path):
    strength = 0.75
    deltas = write_lora(tmp_path / "lora.safetensors", layout, shapes, seed=1, strength=strength)
    merge = merge_of((tmp_path / "lora.safetensors", strength), shapes=shapes)
    model = load_bindweave_transformer(tiny_dit_folder, torch.float32, lora=merge)
    assert_merged(model.state_dict(), load_file(tiny_dit_folder / WEIGHTS), deltas)
    assert {name for name in shapes if merge.changes(name)} == set(deltas)


def test_the_merge_is_cast_once_into_the_models_dtype(tiny_dit_folder, shapes, tmp_path):
    write_lora(tmp_path / "lora.safetensors", "wan_down_up_alpha", shapes, seed=11)
    merge = merge_of((tmp_path / "lora.safetensors", 1.0), shapes=shapes)
    in_bf16 = load_bindweave_transformer(tiny_dit_folder, torch.bfloat16, lora=merge).state_dict()
    in_fp32 = load_bindweave_transformer(tiny_dit_folder, torch.float32, lora=merge).state_dict()
    for name, tensor in in_bf16.items():  # the float32 merge, rounded once (norms and modulation stay float32)
        assert torch.equal(tensor, in_fp32[name].to(tensor.dtype)), name
    # Rounding the stored weight to bf16 before adding would differ: the check above sees the order.
    name, stored = "blocks.0.attn1.to_q.weight", load_file(tiny_dit_folder / WEIGHTS)
    twice = (stored[name].bfloat16().float() + (in_fp32[name] - stored[name])).bfloat16()
    assert not torch.equal(in_bf16[name], twice)


def test_stacked_loras_add(tiny_dit_folder, shapes, tmp_path):
    first = write_lora(tmp_path / "a.safetensors", "wan_down_up_alpha", shapes, seed=2, strength=0.5)
    second = write_lora(tmp_path / "b.safetensors", "musubi", shapes, seed=3, strength=-1.25)
    merge = merge_of((tmp_path / "a.safetensors", 0.5), (tmp_path / "b.safetensors", -1.25), shapes=shapes)
    loaded = load_bindweave_transformer(tiny_dit_folder, torch.float32, lora=merge).state_dict()
    assert_merged(loaded, load_file(tiny_dit_folder / WEIGHTS), first, second)
    assert [entry["parameters"] for entry in merge.record()] == [len(first), len(second)]


def test_the_record_has_each_files_fingerprint_strength_and_count(shapes, tmp_path):
    write_lora(tmp_path / "partial.safetensors", "wan_A_B", shapes, seed=4)
    merge = merge_of((tmp_path / "partial.safetensors", 0.8), shapes=shapes)
    digest = hashlib.sha256((tmp_path / "partial.safetensors").read_bytes()).hexdigest()
    changed = len(MODULES) + len(FULL_DELTAS)
    assert merge.record() == [{"path": str(tmp_path / "partial.safetensors"), "sha256": digest, "strength": 0.8,
                               "parameters": changed}]
    # A LoRA on some layers says how many it changes: here both tiny blocks and 2 parameters outside them.
    assert f"{changed} parameters in 2 of 2 blocks and 2 outside them" in merge.summary()


def test_the_offload_loader_fills_the_host_buffer_with_the_resident_merge(tiny_dit_folder, shapes, tmp_path):
    write_lora(tmp_path / "lora.safetensors", "wan_down_up_alpha", shapes, seed=5)
    merge = merge_of((tmp_path / "lora.safetensors", 1.5), shapes=shapes)
    resident = load_bindweave_transformer(tiny_dit_folder, torch.bfloat16, lora=merge)
    fuse_projections(resident, keep_separate=False)  # fused rows: the buffer's, filled piece by piece
    streamed = load_bindweave_to_host_buffer(tiny_dit_folder, torch.bfloat16, fuse=True, lora=merge)
    expected = resident.state_dict()
    assert streamed.state_dict().keys() == expected.keys()
    for name, tensor in streamed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fsdp_ranks_merge_their_own_rows_to_the_resident_merge(tiny_dit_folder, shapes, tmp_path):
    write_lora(tmp_path / "a.safetensors", "wan_down_up_alpha", shapes, seed=6)
    write_lora(tmp_path / "b.safetensors", "diffusers", shapes, seed=7)
    loras = [[str(tmp_path / "a.safetensors"), 0.6], [str(tmp_path / "b.safetensors"), 1.0]]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests/parallel_lora.py"), str(tiny_dit_folder), json.dumps(loras), str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    resident = load_bindweave_transformer(tiny_dit_folder, torch.float32, lora=merge_of(
        *((Path(path), strength) for path, strength in loras), shapes=shapes))
    fuse_projections(resident, keep_separate=False)
    sharded = torch.load(tmp_path / "merged.pt")
    assert sharded.keys() == resident.state_dict().keys()
    for name, tensor in resident.state_dict().items():
        assert torch.equal(sharded[name], tensor), name


def bad_lora(kind: str, shapes) -> dict:
    q = shapes["blocks.0.attn1.to_q.weight"]
    pair = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, q[1]),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(q[0], RANK)}
    if kind == "unmatched":  # a block the DiT does not have, a module it does not have
        return {**pair, "diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(RANK, q[1]),
                "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(q[0], RANK),
                "transformer.blocks.0.attn1.to_z.lora_A.weight": torch.zeros(RANK, q[1])}
    if kind == "wrong_shape":  # another model's width; a T2V patch embedding (16 input channels)
        return {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 48),
                "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(48, RANK),
                "diffusion_model.patch_embedding.lora_down.weight": torch.zeros(RANK, 16, 1, 2, 2),
                "diffusion_model.patch_embedding.lora_up.weight": torch.zeros(q[0], RANK, 1, 1, 1),
                "diffusion_model.blocks.0.norm3.diff": torch.zeros(48)}
    if kind == "missing_half":
        return {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, q[1]),
                "diffusion_model.blocks.0.self_attn.k.lora_up.weight": torch.zeros(q[0], RANK),
                "diffusion_model.blocks.0.self_attn.v.alpha": torch.tensor(4.0)}
    if kind == "unknown_ending":  # DoRA's magnitude, LoHa's factors
        return {**pair, "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(1, q[1]),
                "diffusion_model.blocks.0.self_attn.k.hada_w1_a": torch.zeros(q[0], RANK)}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, named", [
    ("unmatched", ["3 keys that name no parameter", "blocks.7.self_attn.q.lora_down.weight", "to_z.lora_A.weight"]),
    ("wrong_shape", ["3 wrong shapes", "self_attn.q.lora_down.weight [4, 48]", "patch_embedding.lora_down.weight",
                     "norm3.diff [48] (the DiT's blocks.0.norm2.weight is [32])"]),
    ("missing_half", ["3 incomplete pairs", "q.lora_down.weight without its lora_B", "k.lora_up.weight without its "
                      "lora_A", "v.alpha without its lora_A/lora_B pair"]),
    ("unknown_ending", ["2 keys with an unknown ending", "q.dora_scale", "k.hada_w1_a"]),
])
def test_a_lora_that_does_not_fit_is_refused_from_its_headers_naming_the_keys(kind, named, shapes, tmp_path):
    path = tmp_path / f"{kind}.safetensors"
    save_file(bad_lora(kind, shapes), path)
    good = tmp_path / "good.safetensors"
    write_lora(good, "wan_A_B", shapes, seed=8)
    # Only the meta model's shapes: no weight of the DiT exists yet.
    with pytest.raises(BindWeaveInputError) as error:
        merge_of((good, 1.0), (path, 1.0), shapes=shapes)
    message = str(error.value)
    assert message.startswith("1 LoRA file(s) in model.loras do not fit") and str(path) in message
    assert str(good) not in message and "remove them from model.loras" in message
    for text in named:
        assert text in message, (text, message)


def test_a_missing_or_unreadable_file_is_named(shapes, tmp_path):
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(BindWeaveInputError) as error:
        merge_of((tmp_path / "absent.safetensors", 1.0), (tmp_path / "truncated.safetensors", 1.0), shapes=shapes)
    assert "2 LoRA file(s)" in str(error.value)
    assert f"{tmp_path / 'absent.safetensors'}: no such file" in str(error.value)
    assert f"{tmp_path / 'truncated.safetensors'}: not a readable safetensors file" in str(error.value)


def test_the_settings_check_their_values():
    assert LoraSettings("x.safetensors").strength == 1.0
    with pytest.raises(BindWeaveInputError, match="has no path"):
        LoraSettings("")
    with pytest.raises(BindWeaveInputError, match="strength=inf of x.safetensors must be a finite"):
        LoraSettings("x.safetensors", float("inf"))



def fused_by_diffusers(folder: Path, lora, strength: float, **how) -> dict:
    """diffusers' own LoRA path on the tiny DiT: PEFT layers from ``lora`` (a folder or a converted
    state dict), fused with ``strength``, unloaded."""
    model = load_bindweave_transformer(folder, torch.float32)
    model.load_lora_adapter(lora, adapter_name="oracle", **how)
    model.fuse_lora(lora_scale=strength)
    model.unload_lora()
    return model.state_dict()


def assert_merged_as(folder: Path, merge: LoraMerge, expected: dict) -> None:
    merged = load_bindweave_transformer(folder, torch.float32, lora=merge).state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6, msg=name)


def test_an_adapter_diffusers_saved_merges_as_diffusers_fuses_it(tiny_dit_folder, shapes, tmp_path):
    """lora_alpha, an alpha pattern (in the file's metadata) and PEFT's bias, as diffusers writes them."""
    LoraConfig = pytest.importorskip("peft", reason="peft (the test extra) runs diffusers' LoRA layers").LoraConfig

    model = load_bindweave_transformer(tiny_dit_folder, torch.float32)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=6, alpha_pattern={"attn2.add_k_proj": 2}, lora_bias=True,
                                 target_modules=["to_q", "add_k_proj", "net.0.proj", "proj_out"]), "trained")
    generator = torch.Generator().manual_seed(9)
    for name, parameter in model.named_parameters():
        if "lora_" in name:  # lora_B starts at zero: give every factor values
            parameter.data = torch.randn(parameter.shape, generator=generator)
    model.save_lora_adapter(tmp_path, adapter_name="trained")
    path = tmp_path / "pytorch_lora_weights.safetensors"
    merge = merge_of((path, 0.6), shapes=shapes)
    # Weight and bias of 4 linears per block (to_q twice, add_k_proj, net.0.proj), the image embedder's and proj_out.
    assert merge.record()[0]["parameters"] == 2 * (2 * 4 + 2)
    assert_merged_as(tiny_dit_folder, merge, fused_by_diffusers(
        tiny_dit_folder, str(tmp_path), 0.6, prefix=None, use_safetensors=True))  # the metadata: a safetensors read


def test_an_original_wan_lora_merges_as_diffusers_converts_and_fuses_it(tiny_dit_folder, shapes, tmp_path):
    """diffusers' converter on the pairs and bias deltas it knows (it drops the norm and weight diffs)."""
    pytest.importorskip("peft", reason="peft (the test extra) runs diffusers' LoRA layers")
    from diffusers.loaders import WanLoraLoaderMixin

    generator = torch.Generator().manual_seed(10)
    tensors = {}
    for block in range(2):
        for attn, names in (("self_attn", "qkvo"), ("cross_attn", ("q", "k", "v", "o", "k_img", "v_img"))):
            for name in names:
                key = f"diffusion_model.blocks.{block}.{attn}.{name}"
                tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, 32, generator=generator)
                tensors[f"{key}.lora_up.weight"] = torch.randn(32, RANK, generator=generator)
                tensors[f"{key}.alpha"] = torch.tensor(float(block + 2))
                tensors[f"{key}.diff_b"] = torch.randn(32, generator=generator)
    save_file(tensors, tmp_path / "wan.safetensors")
    path = tmp_path / "wan.safetensors"
    expected = fused_by_diffusers(tiny_dit_folder, WanLoraLoaderMixin.lora_state_dict(str(path)), 1.3, prefix="transformer")
    assert_merged_as(tiny_dit_folder, merge_of((path, 1.3), shapes=shapes), expected)


def test_the_lightx2v_i2v_layout_maps_onto_every_block_parameter_it_names(tiny_dit_folder, shapes, tmp_path):
    """Pairs and bias deltas on all 12 linears of a block (the image K/V too), the norms' deltas, the
    modulation: every key of that layout is a parameter of the DiT, and the merge changes them all."""
    from bindweave.testing.lora import write_lightx2v_style_lora

    changed = write_lightx2v_style_lora(tmp_path / "distill.safetensors", shapes, rank=8, seed=12)
    merge = merge_of((tmp_path / "distill.safetensors", 1.0), shapes=shapes)
    assert {name for name in shapes if merge.changes(name)} == set(changed)
    per_block = 2 * 12 + 5 + 2 + 1  # 12 linears (weight, bias), 5 RMS norm scales, the affine norm2, the modulation
    assert len(changed) == 2 * per_block
    assert f"{2 * per_block} parameters in 2 of 2 blocks" in merge.summary()
