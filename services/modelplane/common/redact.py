"""Keeping credentials out of logs, events, errors, metric labels and the registry."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Query parameters that carry a secret: presigned S3 and GCS URLs, Azure SAS tokens, and the
# common ways of putting a token or password in a URL. Compared in lowercase.
_SECRET_PARAMETERS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "signature",
        "sig",
        "token",
        "access_token",
        "auth",
        "api_key",
        "apikey",
        "key",
        "password",
        "passwd",
        "secret",
        "client_secret",
    }
)
# What a stored credential is replaced with: still visibly a credential, so the loader refuses the
# URI with the message that says where credentials belong, instead of fetching without them.
MASK = "***"

# Where the loader takes credentials from, for messages that refuse them in a URI.
CREDENTIALS_BELONG = (
    "Register the URI without them and give them to the loader: S3 credentials as "
    "MODELPLANE_LOADER_S3_ACCESS_KEY_ID and MODELPLANE_LOADER_S3_SECRET_ACCESS_KEY (or the standard AWS_* "
    "variables), an HTTP server's token as MODELPLANE_LOADER_HTTP_BEARER_TOKEN."
)


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


def credentials_in_uri(uri: str) -> str:
    """What in the URI is a credential ("a user name or password", "the query parameter
    'X-Amz-Signature'"), or "" when it holds none."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return ""
    if parts.username is not None or parts.password is not None:
        return "a user name or password"
    if parts.scheme not in ("http", "https"):
        return ""  # a local path may hold '?' in a file name; S3 URIs have no query
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower() in _SECRET_PARAMETERS:
            return f"the query parameter '{name}'"
    return ""


def mask_credentials(uri: str) -> str:
    """The URI with its user info and secret query values replaced by ***; the rest as it was.
    For URIs stored before the registry refused credentials."""
    if not credentials_in_uri(uri):
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if parts.scheme in ("http", "https") and query:
        query = urlencode(
            [
                (name, MASK if name.lower() in _SECRET_PARAMETERS else value)
                for name, value in parse_qsl(query, keep_blank_values=True)
            ],
            safe="*",
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# An absolute filesystem path (not the path of a URL: "//" or "scheme:" comes before that).
_SERVER_PATH = re.compile(r"(?<![\w.:/~-])/(?:[\w.@+~-]+/)+([\w.@+~-]+)")


def without_server_paths(text: str) -> str:
    """Text from a library or a subprocess (an error, a checker's finding) with each absolute path
    cut to its last part ('/var/cache/modelplane/packages/ab…/model.onnx' → 'model.onnx'): the file
    is still named, where the server keeps it is not."""
    return _SERVER_PATH.sub(r"\1", text)
