"""BindWeave subject-to-video inference on GPUs: the model, its inputs and the stage-3 pipeline."""

from bindweave.model.transformer import BindWeaveTransformer

__all__ = ["BindWeaveTransformer"]
