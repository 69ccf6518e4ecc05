"""Keeping credentials out of logs, events, errors and metric labels."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_uri(uri: str) -> str:
    """Drops user info and the query string (where presigned URLs keep their signatures)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    if not parts.scheme or parts.scheme == "file":
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    if parts.username or parts.password:
        host = f"***@{host}"
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, query, ""))
