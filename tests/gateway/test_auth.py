"""API keys: digests only, the headers Dify sends, the keys file and its mistakes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from modelplane.gateway.auth import Caller, KeyConfigError, KeyRing
from modelplane.gateway.errors import ModelNotAllowed, Unauthenticated
from modelplane.gateway.settings import GatewaySettings


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Bearer None", "bearer anything", "Basic Zm9v"])
def test_without_keys_every_authorization_header_is_accepted(header: str | None) -> None:
    keys = KeyRing.from_settings(GatewaySettings())
    assert not keys.enabled
    assert keys.authenticate(header).name == "anonymous"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer None", "Bearer null", "Basic c2VjcmV0"])
def test_with_keys_a_missing_key_is_refused_with_how_to_send_one(header: str | None) -> None:
    keys = KeyRing.from_settings(GatewaySettings(api_keys="secret"))
    with pytest.raises(Unauthenticated) as refused:
        keys.authenticate(header)
    assert "Authorization: Bearer <key>" in refused.value.message
    assert refused.value.status == 401 and refused.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_with_keys_a_wrong_key_is_refused() -> None:
    keys = KeyRing.from_settings(GatewaySettings(api_keys="secret"))
    with pytest.raises(Unauthenticated, match="not valid"):
        keys.authenticate("Bearer secreT")


def test_plain_and_digest_entries_are_both_accepted_and_only_digests_are_kept() -> None:
    settings = GatewaySettings(api_keys=f" first-key , sha256:{_sha('second-key').upper()} ")
    keys = KeyRing.from_settings(settings)
    assert keys.authenticate("Bearer first-key").name == f"key-{_sha('first-key')[:8]}"
    assert keys.authenticate("bearer   second-key").name == f"key-{_sha('second-key')[:8]}"
    assert "first-key" not in repr(vars(keys))


def test_settings_never_print_the_keys() -> None:
    settings = GatewaySettings(api_keys="very-secret-key")
    assert "very-secret-key" not in repr(settings) and "very-secret-key" not in str(settings.model_dump())


def test_keys_file_with_allow_list_and_rate(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(
        f"""
[[keys]]
name = "dify"
sha256 = "{_sha("dify-key")}"
models = ["all-minilm-l6-v2"]
requests_per_minute = 60

[[keys]]
key = "ops-key"
"""
    )
    keys = KeyRing.from_settings(GatewaySettings(api_keys_file=path, rate_limit_per_minute=5))
    dify = keys.authenticate("Bearer dify-key")
    assert dify == Caller("dify", frozenset({"all-minilm-l6-v2"}), 60)
    ops = keys.authenticate("Bearer ops-key")
    assert ops.models is None and ops.requests_per_minute == 5
    assert ops.may_use("anything")
    with pytest.raises(ModelNotAllowed) as refused:
        dify.authorize_model("tiny-cross-encoder")
    assert refused.value.status == 403
    assert (
        "API key 'dify' may not use model 'tiny-cross-encoder'; it may use: all-minilm-l6-v2" in refused.value.message
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not toml [", "is not valid TOML"),
        ("[other]\nx = 1", "has no [[keys]] entries"),
        ('[[keys]]\nname = "a"', "needs exactly one of 'sha256' (preferred) or 'key'"),
        ('[[keys]]\nsha256 = "abc"', "'sha256:' must be followed by 64 hex digits"),
        ('[[keys]]\nkey = "k"\nmodels = "m"', "'models' must be a list of model names"),
        ('[[keys]]\nkey = "k"\nrequests_per_minute = -1', "'requests_per_minute' must be a whole number"),
        ('[[keys]]\nkey = "k"\nmodel = ["m"]', "unknown fields: model"),
        ('[[keys]]\nkey = "k"\n[[keys]]\nkey = "k"', "configured twice"),
    ],
)
def test_keys_file_mistakes_stop_the_gateway_with_the_entry(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(content)
    with pytest.raises(KeyConfigError, match="keys") as refused:
        KeyRing.from_settings(GatewaySettings(api_keys_file=path))
    assert message in str(refused.value)


def test_missing_keys_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match=r"Cannot read the API keys file .*absent\.toml"):
        KeyRing.from_settings(GatewaySettings(api_keys_file=tmp_path / "absent.toml"))
