"""BindWeave subject-to-video inference on GPUs: the model, its inputs and the stage-3 pipeline."""

__all__ = ["BindWeaveTransformer"]


def __getattr__(name: str):
    # Lazy: importing the package (e.g. for launch/compare.py) does not pay for diffusers' import.
    if name == "BindWeaveTransformer":
        from bindweave.model.transformer import BindWeaveTransformer

        return BindWeaveTransformer
    raise AttributeError(f"module 'bindweave' has no attribute {name!r}")
