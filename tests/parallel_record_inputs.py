"""Run launch/generate.py in this process, recording what stage 3 reads and decodes on this rank.

    torchrun --standalone --nproc_per_node=N tests/parallel_record_inputs.py RECORD_DIR [overrides]

Each rank appends ``kind<TAB>value`` lines to ``RECORD_DIR/rank{RANK}.tsv``: ``hidden_states``
and ``image`` for every sample input file the pipeline opens, ``decode`` for every VAE decode,
``load_models`` when the weights start loading.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bindweave.stages.job as jobs  # noqa: E402
import bindweave.stages.models as pipeline  # noqa: E402


def main() -> None:
    record_dir = Path(sys.argv[1])
    record_dir.mkdir(parents=True, exist_ok=True)
    record_file = record_dir / f"rank{os.environ.get('RANK', '0')}.tsv"

    def record(kind: str, value: object) -> None:
        with open(record_file, "a") as file:
            file.write(f"{kind}\t{value}\n")

    load_hidden_states, load_image = jobs.load_sample_hidden_states, jobs.load_reference_image
    decode = pipeline.WanVae.decode_to_frames
    load_models = pipeline.load_stage3_models

    def recorded_load_models(plan, *args, **kwargs):
        record("load_models", plan.device)
        return load_models(plan, *args, **kwargs)

    def recorded_hidden_states(sample, *args, **kwargs):
        record("hidden_states", sample.hidden_states_path)
        return load_hidden_states(sample, *args, **kwargs)

    def recorded_image(path, *args, **kwargs):
        record("image", path)
        return load_image(path, *args, **kwargs)

    def recorded_decode(vae, latents, *args, **kwargs):
        record("decode", tuple(latents.shape))
        return decode(vae, latents, *args, **kwargs)

    jobs.load_sample_hidden_states = recorded_hidden_states
    jobs.load_reference_image = recorded_image
    pipeline.WanVae.decode_to_frames = recorded_decode
    pipeline.load_stage3_models = recorded_load_models
    sys.argv = [str(REPO / "launch" / "generate.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
