"""Bearer-token auth: the API keys are read once at start-up, from ``serve.api_keys_file`` (one
key per line, blank lines and ``#`` comments ignored) and/or the variable named by
``serve.api_keys_env`` (comma-separated; default ``BINDWEAVE_API_KEYS``).

    keys = load_api_keys(settings)          # BindWeaveInputError: no keys, unreadable file
    check_bearer(request.headers.get("authorization"), keys)   # ApiError(401) unless one matches

``serve.auth=none`` (allowed only on a loopback host, see settings.py) gives ``None``: every
request passes. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from bindweave.errors import BindWeaveInputError
from bindweave.serve.errors import ApiError
from bindweave.serve.settings import ServeSettings

MIN_KEY_CHARS = 8


def load_api_keys(settings: ServeSettings) -> tuple[bytes, ...] | None:
    if settings.auth == "none":
        return None
    keys = [key.strip() for key in os.environ.get(settings.api_keys_env, "").split(",")]
    if settings.api_keys_file:
        path = Path(settings.api_keys_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise BindWeaveInputError(f"serve.api_keys_file={path}: cannot read it ({error})") from None
        keys += [line.strip() for line in lines if not line.strip().startswith("#")]
    keys = [key for key in keys if key]
    if not keys:
        raise BindWeaveInputError(f"serve.auth=api_keys but no API key is set: export "
                                  f"{settings.api_keys_env}=KEY[,KEY2] "
                                  "or pass serve.api_keys_file=FILE (one key per line); on this machine only, "
                                  "serve.auth=none serve.host=127.0.0.1")
    short = [key for key in keys if len(key) < MIN_KEY_CHARS]
    if short:
        raise BindWeaveInputError(f"{len(short)} API key(s) shorter than {MIN_KEY_CHARS} characters: use long random "
                                  "keys (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return tuple(key.encode("utf-8") for key in keys)


def check_bearer(authorization: str | None, keys: tuple[bytes, ...] | None) -> None:
    if keys is None:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="missing_api_key",
                       headers=challenge)
    given = token.strip().encode("utf-8")
    # Every key is compared (no early exit), so the time taken does not tell which one came close.
    if not sum(hmac.compare_digest(given, key) for key in keys):
        raise ApiError(401, "invalid API key", code="invalid_api_key", headers=challenge)
