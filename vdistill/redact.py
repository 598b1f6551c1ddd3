"""The one place credentials are taken out of what is written or printed (config.json, MLflow, console).

Two kinds: values under credential keys (access_key, secret_key, token, password, ...) are dropped, and
the userinfo of any URL (`scheme://user:password@host` -> `scheme://host`) is removed from every string.
The config itself keeps them: connecting still uses the real credentials.
"""
from __future__ import annotations

import re
from typing import Any

CREDENTIAL_KEY = re.compile(r"secret|password|passwd|token|access_key|credential|api_key", re.IGNORECASE)
_URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")  # up to the last @ before the path


def redact_text(text: str) -> str:
    """`text` with the userinfo of every URL in it removed."""
    return _URL_USERINFO.sub(r"\1", text)


def redact(value: Any) -> Any:
    """A copy of a JSON-like tree without credential keys and with URL userinfo removed from every string."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items() if not CREDENTIAL_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
