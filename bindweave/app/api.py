"""The Python door, for notebooks and scripts: the same settings, plan and engine as the commands.

    from bindweave.app.api import VideoMaker

    maker = VideoMaker.from_overrides(["model=bindweave_14b", "model.dit=weights/BindWeave",
                                       "model.wan=weights/Wan2.1-I2V-14B-720P-Diffusers", "speed=fast"],
                                      qwen_overrides=["qwen=qwen2_5_vl_7b", "qwen.path=weights/Qwen2.5-VL-7B-Instruct"])
    result = maker.make("a corgi runs on the beach", images=["corgi.png"], seed=7, output_path="corgi.mp4")
    result.record["plan"]          # what ran: the build plan (kernel, FP8, memory plan, LoRAs)

``overrides`` are those of ``launch/generate.py`` (composed and checked the same way: a typo is
one BindWeaveInputError naming the key); the engine is built by bindweave/app/build.py as the
command builds it. Without ``hidden_states`` a prompt's Qwen2.5-VL states are computed in memory,
as the server does (stage 2, loaded on first use from ``qwen_overrides``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bindweave.app.build import BuildRequest, build_single_process_engine
from bindweave.app.config import check_command_line, compose_config, settings_of
from bindweave.stages.engine import JobResult, Stage3Engine
from bindweave.stages.job import Stage3Job


@dataclass
class VideoMaker:
    engine: Stage3Engine
    config: object  # bindweave.app.config.GenerateConfig: the defaults of every video
    qwen_overrides: tuple[str, ...] = ()
    _encode: object = field(default=None, repr=False)

    @classmethod
    def from_overrides(cls, overrides: Sequence[str] = (), qwen_overrides: Sequence[str] = ()) -> VideoMaker:
        """The engine ``python launch/generate.py OVERRIDES`` would build (one process); no overrides:
        the tiny CPU models (the videos are noise)."""
        check_command_line("generate", list(overrides))
        config = settings_of(compose_config("generate", list(overrides)))
        engine = build_single_process_engine(BuildRequest(config.model, config.video, config.parallel, config.sampler))
        return cls(engine, config, tuple(qwen_overrides))

    def make(self, prompt: str, images: Sequence = (), seed: int | None = None, output_path: str | Path | None = None,
             hidden_states: tuple | None = None, sample_id: str = "video", **sampler_options) -> JobResult:
        """One video: ``images`` (1 to 4 paths or PIL images), ``hidden_states`` (a positive and a
        negative [1, L, 3584] tensor or file; None: computed here); ``output_path`` None returns the
        frames in ``result.frames`` and writes nothing. ``sampler_options`` override ``sampler.*``
        (``num_steps=...``, ``guidance_scale=...``)."""
        if hidden_states is None:
            from bindweave.io.inputs import load_reference_image

            pictures = [load_reference_image(Path(image)) if isinstance(image, (str, Path)) else image
                        for image in images]
            hidden_states = self._prompt_encoder()(prompt, pictures)
        sampler = replace(self.config.sampler, **sampler_options)
        job = Stage3Job.from_request(sample_id, prompt, self.config.video, sampler,
                                     Path(output_path) if output_path is not None else None, images=list(images),
                                     hidden_states=hidden_states, seed=seed, cache=self.config.cache)
        return self.engine.run(job)

    def _prompt_encoder(self):
        if self._encode is None:
            from bindweave.encoders.qwen import load_qwen
            from bindweave.serve.hidden_states import PromptEncoder

            self._encode = PromptEncoder(load_qwen(settings_of(compose_config("extract", list(self.qwen_overrides))).qwen))
        return self._encode
