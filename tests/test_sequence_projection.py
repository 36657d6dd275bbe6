"""The multi-GPU projection's parts (bindweave/testing/sequence_benchmark.py): the emulated Ulysses rank
computes at a real rank's shapes, the bytes formulas are what real ranks send, and the projection's
arithmetic. The whole part runs end to end in tests/test_bench.py."""

import json
import math

import pytest
import torch

from bindweave.model.attention import AttentionHook, sdpa
from bindweave.model.flops import video_tokens
from bindweave.model.transformer import TINY_CONFIG, BindWeaveTransformer
from bindweave.testing.sequence_benchmark import EmulatedUlyssesRank, project_layouts, projection_table
from parallel.cfg import cfg_exchange_bytes_per_rank
from parallel.sequence import ulysses_bytes_per_rank
from parallel_launch import run_script
from support.dit_inputs import tiny_dit_inputs as tiny_inputs

DIVIDES, PADS = "3x8x12", "1x6x6"  # 7 x 4 x 6 = 168 tokens, 5 x 3 x 3 = 45 (odd: padded to 46 over 2 ranks)


class ShapeRecordingKernel(AttentionHook):
    def __init__(self):
        self.shapes = []

    def self_attention(self, query, key, value):
        self.shapes.append((tuple(query.shape), tuple(key.shape), tuple(value.shape)))
        return sdpa(query, key, value)


def tiny_model():
    torch.manual_seed(0)
    return BindWeaveTransformer(**TINY_CONFIG).eval()


def grid_tokens(grid: str) -> int:
    return video_tokens(TINY_CONFIG, *(int(size) for size in grid.split("x")))


@torch.no_grad()
def test_emulated_rank_of_degree_one_is_the_single_device_forward():
    x = tiny_inputs()
    expected = tiny_model()(**x)
    model = tiny_model()
    model.set_attention_hook(EmulatedUlyssesRank(AttentionHook(), degree=1))
    torch.testing.assert_close(model(**x), expected, rtol=0, atol=0)


@torch.no_grad()
def test_emulated_rank_attends_at_the_shapes_after_the_all_to_all():
    """45 tokens over 2 ranks: each holds 23 (one padded), attends the 46 padded queries against the
    45 real keys with one of the 2 heads, and the output has the whole video's shape."""
    frames, height, width = (int(size) for size in PADS.split("x"))
    x = tiny_inputs(frames=frames, height=height, width=width)
    kernel = ShapeRecordingKernel()
    model = tiny_model()
    model.set_attention_hook(EmulatedUlyssesRank(kernel, degree=2))
    assert model(**x).shape == x["latents"].shape
    head_dim = TINY_CONFIG["attention_head_dim"]
    assert grid_tokens(PADS) == 45
    shapes = ((1, 46, 1, head_dim), (1, 45, 1, head_dim), (1, 45, 1, head_dim))  # query, key, value
    assert kernel.shapes == [shapes] * TINY_CONFIG["num_layers"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bytes_formulas_are_what_two_gloo_ranks_send(tmp_path):
    """One forward under deepspeed's Ulysses on 2 ranks, for a token count that divides 2 and one that
    does not, and one CFG exchange: every byte each rank sent, counted at torch.distributed."""
    run_script("tests/parallel_count_bytes.py", tmp_path, "--grid", DIVIDES, "--grid", PADS, processes=2, timeout=100)
    config, element_size = TINY_CONFIG, 4  # float32
    head_out_channels = config["out_channels"] * math.prod(config["patch_size"])
    for rank in range(2):
        record = json.loads((tmp_path / f"bytes.rank{rank}.json").read_text())
        for grid in (DIVIDES, PADS):
            expected = ulysses_bytes_per_rank(grid_tokens(grid), config["num_attention_heads"],
                                              config["attention_head_dim"], config["num_layers"], 2, element_size,
                                              head_out_channels)
            calls = {"all_to_all_single": 4 * config["num_layers"], "all_gather": 1}  # and no other collective
            assert record["forward"][grid] == {"bytes": expected, "calls": calls}
        exchange = record["cfg_exchange"]
        assert exchange["calls"] == {"all_gather": 1}
        assert exchange["bytes"] == cfg_exchange_bytes_per_rank(exchange["prediction_elements"], element_size, 2) > 0


def test_bytes_formula_by_hand():
    # 10 tokens over 4 ranks: 3 each (padded). Per block 4 all-to-alls of [3 tokens, 8 heads, 16], 3/4 of
    # it to the other ranks (3 x 2 heads x 16 x 3); after the head 3 x 64 outputs to each of 3 ranks; bf16.
    assert ulysses_bytes_per_rank(10, heads=8, head_dim=16, layers=5, degree=4, element_size=2,
                                  head_out_channels=64) == (5 * 4 * 3 * 2 * 16 * 3 + 3 * 64 * 3) * 2
    assert ulysses_bytes_per_rank(10, heads=8, head_dim=16, layers=5, degree=1, element_size=2,
                                  head_out_channels=64) == 0
    assert cfg_exchange_bytes_per_rank(100, 2, cfg_degree=1) == 0


def test_projection_by_hand():
    rows = project_layouts(rank_forward_s={1: 10.0, 2: 5.5, 4: 3.0}, forward_bytes={1: 0, 2: 3e9, 4: 4.5e9},
                           cfg_exchange_bytes=1e8, interconnect_gb_s=100, steps=50, video_overhead_s=20.0)
    # 100 GB/s: 3e9 B take 0.03 s, 4.5e9 B 0.045 s, the 1e8 B exchange 0.001 s; degree 8 was not measured.
    expected = {  # (cfg, ulysses): (s/forward, s/step, s/video)
        (1, 1): (10.0, 20.0, 1020.0),
        (2, 1): (10.0, 10.001, 520.05),
        (1, 2): (5.53, 11.06, 573.0),
        (2, 2): (5.53, 5.531, 296.55),
        (1, 4): (3.045, 6.09, 324.5),
        (2, 4): (3.045, 3.046, 172.3),
    }
    assert [(row["cfg"], row["ulysses"]) for row in rows] == list(expected)
    for row in rows:
        forward_s, step_s, video_s = expected[row["cfg"], row["ulysses"]]
        assert row["gpus"] == row["cfg"] * row["ulysses"]
        assert (row["forward_s"], row["step_s"], row["video_s"]) == pytest.approx((forward_s, step_s, video_s))
        assert row["speedup"] == pytest.approx(1020.0 / video_s)
    table = projection_table(rows, steps=50, interconnect_gb_s=100, video_overhead_s=20.0)
    assert table[2].startswith("| GPUs |") and len(table) == 4 + len(rows)
    assert table[-1] == "| 8 | cfg2 x ulysses4 | 3.000 | 0.045 | 3.05 | 172.3 | 5.92x |"
