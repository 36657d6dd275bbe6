"""Stage-1 refiner settings (``refiner.*``, bindweave/stages/refine.py): an OpenAI-compatible
endpoint (``refiner=openai``) or the local Qwen2.5-VL (``refiner=local``)."""

from __future__ import annotations

from dataclasses import dataclass

from bindweave.errors import BindWeaveInputError


@dataclass(frozen=True)
class EndpointSettings:
    base_url: str  # e.g. https://api.openai.com/v1 or http://localhost:8000/v1 (vLLM)
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the environment variable holding the key
    max_tokens: int = 1024
    timeout_s: float = 120.0  # per request
    max_retries: int = 5  # on 429, 5xx and connection errors
    retry_base_s: float = 2.0  # waits 2, 4, 8, ... seconds
    max_retry_s: float = 300.0  # never wait past this much time in all for one sample

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise BindWeaveInputError(f"refiner.base_url={self.base_url} is not an http(s) URL: e.g. "
                                      "refiner.base_url=http://localhost:8000/v1")
        if self.max_tokens < 1 or self.timeout_s <= 0 or self.max_retries < 0:
            raise BindWeaveInputError(f"refiner.max_tokens={self.max_tokens}, refiner.timeout_s={self.timeout_s}, "
                                      f"refiner.max_retries={self.max_retries}: use >= 1, > 0 and >= 0")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclass(frozen=True)
class LocalSettings:
    max_new_tokens: int = 512
    # Only for the tiny random model of the demo, which never emits end-of-turn: keep its cut-off
    # gibberish instead of refusing it.
    allow_truncated: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise BindWeaveInputError(f"refiner.max_new_tokens={self.max_new_tokens} must be >= 1")
