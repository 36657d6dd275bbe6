"""The fresh-machine demo's inputs: built-in cases plus their hidden states from the tiny Qwen2.5-VL."""

from __future__ import annotations

from pathlib import Path

from bindweave.testing.demo_cases import write_demo_cases
from bindweave.errors import BindWeaveInputError
from bindweave.stages.extract import ExtractSettings, run_extract
from bindweave.encoders.qwen import load_qwen
from bindweave.settings.qwen import QwenSettings


def demo_meta_with_hidden_states(folder: Path, hidden_dim: int, qwen_folder: Path) -> Path:
    """Write the demo cases under `folder`, extract their hidden states there with the (tiny) Qwen2.5-VL
    at `qwen_folder` (stage 2, resumable) and return the meta JSON naming them."""
    folder = Path(folder)
    meta_path = write_demo_cases(folder)
    qwen = load_qwen(QwenSettings(path=str(qwen_folder), device="cpu"))
    if qwen.hidden_size != hidden_dim:
        raise BindWeaveInputError(f"the Qwen2.5-VL at {qwen_folder} has hidden size {qwen.hidden_size}, but the DiT "
                                  f"expects {hidden_dim}: use the tiny set written with the tiny DiT")
    return run_extract(qwen, meta_path, folder, ExtractSettings(output_dir=folder, progress=False))
