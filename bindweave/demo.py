"""The fresh-machine demo's inputs: built-in cases plus hidden states made for them on the spot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bindweave.data import read_meta, save_hidden_states
from bindweave.demo_cases import write_demo_cases
from bindweave.outputs import write_json


def demo_meta_with_hidden_states(folder: Path, hidden_dim: int, seed: int = 0) -> Path:
    """Write the demo cases and seeded stand-in hidden states (tiny width) and a meta JSON naming them."""
    source = write_demo_cases(folder)
    entries = json.loads(source.read_text())
    generator = torch.Generator().manual_seed(seed)
    for index, sample in enumerate(read_meta(source)):
        path = folder / "hidden_states" / f"{sample.sample_id}.safetensors"
        if not path.exists():
            tokens = 12 + 5 * index
            positive = torch.randn(1, tokens, hidden_dim, generator=generator)
            negative = torch.randn(1, tokens + 3, hidden_dim, generator=generator)
            save_hidden_states(path, positive, negative, {"source": "random stand-in for the demo"})
        entries[sample.sample_id]["hidden_states_path"] = str(path.relative_to(folder))
    meta_path = folder / "meta_with_features.json"
    write_json(meta_path, entries)
    return meta_path
