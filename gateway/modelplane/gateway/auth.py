"""Who is calling: API keys, kept only as SHA-256 digests, with optional per-key model allow-lists
and request rates.

Keys come from MODELPLANE_GATEWAY_API_KEYS (comma-separated; each a key or `sha256:<hex>`) and from
a TOML file (MODELPLANE_GATEWAY_API_KEYS_FILE):

    [[keys]]
    name = "dify"                                # shown in logs instead of the key
    sha256 = "<hex SHA-256 of the key>"          # or: key = "<the key itself>"
    models = ["all-minilm-l6-v2", "bge-reranker"] # optional; absent means every model
    requests_per_minute = 600                     # optional; absent means the gateway default

A key's digest is `printf %s "$KEY" | sha256sum`. API keys are long random strings, not
passwords, so one unsalted SHA-256 is the right tool: it keeps the key out of memory dumps and
config files without a slow hash on every request.

With no keys configured the gateway is open: every request is accepted whatever its
Authorization header says, including none, an empty one and `Bearer None`, which is what Dify
sends when its API-key field is left empty.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelplane.gateway.errors import ModelNotAllowed, Unauthenticated
from modelplane.gateway.settings import GatewaySettings

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# What clients send when they have no key: Dify formats a missing key as the string "None".
_NO_KEY = frozenset({"", "none", "null", "undefined"})


class KeyConfigError(ValueError):
    """The configured keys cannot be used; the gateway refuses to start rather than run open."""


@dataclass(frozen=True)
class Caller:
    """The identity a request acts as."""

    name: str
    models: frozenset[str] | None = None
    """Models this caller may use; None means every model."""
    requests_per_minute: int = 0
    """0 means no limit."""

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def authorize_model(self, model: str) -> None:
        if not self.may_use(model):
            allowed = ", ".join(sorted(self.models or ())) or "none"
            raise ModelNotAllowed(
                f"API key '{self.name}' may not use model '{model}'; it may use: {allowed}. "
                "Ask the gateway's operator to extend the key's `models` list.",
                param="model",
            )


# The caller of the request being handled; set by the access middleware for every API request.
current_caller: ContextVar[Caller | None] = ContextVar("current_caller", default=None)


def authorize_model(model: str) -> None:
    """Refuses a model outside the current caller's allow-list (a no-op outside a request)."""
    caller = current_caller.get()
    if caller is not None and model:
        caller.authorize_model(model)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _entry_digest(entry: str, where: str) -> str:
    if entry.startswith("sha256:"):
        value = entry.removeprefix("sha256:").lower()
        if not _DIGEST.match(value):
            raise KeyConfigError(f"{where}: 'sha256:' must be followed by 64 hex digits.")
        return value
    return digest(entry)


class KeyRing:
    """The configured keys, by digest."""

    def __init__(self, callers: Mapping[str, Caller], *, default_rate: int = 0) -> None:
        self._by_digest = dict(callers)
        self.anonymous = Caller("anonymous", requests_per_minute=default_rate)

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> KeyRing:
        callers: dict[str, Caller] = {}
        rate = settings.rate_limit_per_minute
        if settings.api_keys is not None:
            entries = [e.strip() for e in settings.api_keys.get_secret_value().split(",") if e.strip()]
            for position, entry in enumerate(entries, start=1):
                value = _entry_digest(entry, f"MODELPLANE_GATEWAY_API_KEYS entry {position}")
                callers[value] = Caller(f"key-{value[:8]}", requests_per_minute=rate)
        if settings.api_keys_file is not None:
            for value, caller in _read_keys_file(settings.api_keys_file, rate):
                if value in callers:
                    raise KeyConfigError(f"{settings.api_keys_file}: key '{caller.name}' is configured twice.")
                callers[value] = caller
        return cls(callers, default_rate=rate)

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller an Authorization header identifies; raises Unauthenticated."""
        if not self.enabled:
            return self.anonymous
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or token.lower() in _NO_KEY:
            raise Unauthenticated(
                "This gateway requires an API key: send it as 'Authorization: Bearer <key>' "
                "(in Dify, fill in the model's API Key field)."
            )
        caller = self._by_digest.get(digest(token))
        if caller is None:
            raise Unauthenticated("The API key is not valid for this gateway; check the key configured in the client.")
        return caller


def _read_keys_file(path: Path, default_rate: int) -> Iterable[tuple[str, Caller]]:
    try:
        document = tomllib.loads(path.read_text())
    except OSError as error:
        raise KeyConfigError(f"Cannot read the API keys file {path}: {error.strerror}.") from None
    except tomllib.TOMLDecodeError as error:
        raise KeyConfigError(f"The API keys file {path} is not valid TOML: {error}.") from None
    entries = document.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeyConfigError(f"The API keys file {path} has no [[keys]] entries.")
    for position, entry in enumerate(entries, start=1):
        yield _read_key_entry(entry, f"{path}, [[keys]] entry {position}", default_rate)


def _read_key_entry(entry: Any, where: str, default_rate: int) -> tuple[str, Caller]:
    if not isinstance(entry, dict):
        raise KeyConfigError(f"{where} is not a table.")
    unknown = set(entry) - {"name", "sha256", "key", "models", "requests_per_minute"}
    if unknown:
        raise KeyConfigError(f"{where} has unknown fields: {', '.join(sorted(unknown))}.")
    if ("sha256" in entry) == ("key" in entry):
        raise KeyConfigError(f"{where} needs exactly one of 'sha256' (preferred) or 'key'.")
    if "sha256" in entry:
        value = _entry_digest(f"sha256:{entry['sha256']}", where)
    else:
        if not isinstance(entry["key"], str) or not entry["key"]:
            raise KeyConfigError(f"{where}: 'key' must be a non-empty string.")
        value = digest(entry["key"])
    name = entry.get("name", f"key-{value[:8]}")
    models = entry.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise KeyConfigError(f"{where}: 'models' must be a list of model names.")
    rate = entry.get("requests_per_minute", default_rate)
    if not isinstance(rate, int) or rate < 0:
        raise KeyConfigError(f"{where}: 'requests_per_minute' must be a whole number, 0 for no limit.")
    return value, Caller(str(name), frozenset(models) if models is not None else None, rate)
