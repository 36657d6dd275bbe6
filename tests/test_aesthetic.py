"""OpenS2V-Eval's aesthetic score (bindweave/quality/aesthetic.py) with a tiny random CLIP of the real
class and a random head in the published layout, and the compare report and command line that use it."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

from bindweave.errors import BindWeaveInputError
from bindweave.quality.aesthetic import AESTHETIC_FRAMES, AestheticHead, AestheticScorer
from bindweave.quality.compare import compare_runs
from test_compare import REPO, moving_square, write_sample


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(CLIP folder, head .pth): CLIP ViT of 2 layers at 32x32 pixels, projecting to ViT-L/14's 768."""
    folder = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=768)
    CLIPVisionModelWithProjection(config).save_pretrained(folder / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "clip")
    torch.save(AestheticHead().state_dict(), folder / "aesthetic-model.pth")
    return folder / "clip", folder / "aesthetic-model.pth"


def test_the_score_is_the_heads_output_on_normalised_embeddings_of_evenly_spread_frames(weights):
    scorer = AestheticScorer.from_files(*weights)
    frames = np.random.default_rng(0).integers(0, 256, (40, 24, 40, 3), dtype=np.uint8)
    # Independently: OpenS2V's frame choice, CLIP's embeddings, the head's five linears by hand.
    picked = [frames[index] for index in np.linspace(0, 39, AESTHETIC_FRAMES, dtype=int)]
    clip = CLIPVisionModelWithProjection.from_pretrained(weights[0])
    pixels = CLIPImageProcessorPil.from_pretrained(weights[0])(images=picked, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        values = clip(pixel_values=pixels).image_embeds
    values = values / values.norm(dim=-1, keepdim=True)
    state = torch.load(weights[1])
    for index in (0, 2, 4, 6, 7):
        values = values @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    assert scorer.score(frames) == pytest.approx(float(values.mean()), rel=1e-5)
    assert scorer.score(frames) != pytest.approx(scorer.score(frames[::-1].copy() // 2), rel=1e-3)  # content counts


def test_a_safetensors_head_loads_and_bad_weights_are_refused_naming_the_flag(weights, tmp_path):
    clip, head = weights
    save_file(torch.load(head), tmp_path / "head.safetensors")
    frames = moving_square(2)
    assert AestheticScorer.from_files(clip, tmp_path / "head.safetensors").score(frames) == pytest.approx(
        AestheticScorer.from_files(clip, head).score(frames))
    with pytest.raises(BindWeaveInputError, match="--aesthetic-head .*no such file"):
        AestheticScorer.from_files(clip, tmp_path / "missing.pth")
    with pytest.raises(BindWeaveInputError, match="--aesthetic-clip .*no config.json"):
        AestheticScorer.from_files(tmp_path, head)
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    for bad in ("other.pth", "broken.pth"):
        with pytest.raises(BindWeaveInputError, match="--aesthetic-head .*not the LAION aesthetic predictor"):
            AestheticScorer.from_files(clip, tmp_path / bad)


def load_compare_command():
    spec = importlib.util.spec_from_file_location("compare_command", REPO / "launch" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_scores_both_runs_and_the_command_needs_both_files(weights, tmp_path, capsys):
    write_sample(tmp_path / "exact", "a", moving_square(4))
    write_sample(tmp_path / "draft", "a", moving_square(0))
    assert "aesthetic" not in compare_runs(tmp_path / "exact", tmp_path / "draft").markdown  # off: no columns
    command = load_compare_command()
    clip, head = weights
    assert command.main([str(tmp_path / "exact"), str(tmp_path / "draft"), "--aesthetic-clip", str(clip),
                         "--aesthetic-head", str(head), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "draft" / "compare" / "compare.json").read_text())
    (sample,) = report["samples"]
    scorer = AestheticScorer.from_files(clip, head)
    assert sample["reference_aesthetic"] == pytest.approx(scorer.score(moving_square(4)), abs=0.05)  # after H.264
    assert report["summary"]["mean_candidate_aesthetic"] == sample["candidate_aesthetic"] is not None
    assert "| aesthetic ref | aesthetic cand |" in (tmp_path / "draft" / "compare" / "compare.md").read_text()
    capsys.readouterr()
    assert command.main([str(tmp_path / "exact"), str(tmp_path / "draft"), "--aesthetic-clip", str(clip)]) == 2
    assert "needs both --aesthetic-clip DIR and --aesthetic-head FILE" in capsys.readouterr().err
