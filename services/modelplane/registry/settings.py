"""Settings of the registry service (env prefix MODELPLANE_REGISTRY_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelplane.common.settings import ServerSettings, modelplane_home


def _default_database_url() -> str:
    return f"sqlite+aiosqlite:///{modelplane_home() / 'registry.db'}"


class RegistrySettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPLANE_REGISTRY_", use_attribute_docstrings=True, extra="ignore")

    port: int = 50051
    """TCP port of the registry's gRPC API."""
    database_url: str = Field(default_factory=_default_database_url)
    """SQLAlchemy URL of the catalogue: sqlite+aiosqlite:///path (one replica) or
    postgresql+asyncpg://user@host/db (several replicas)."""
    node_sweep_interval_seconds: float = Field(default=1.0, gt=0)
    """How often the registry looks for nodes whose lease has lapsed, records them as LOST and
    tells watchers (seconds). Reads see a lapsed lease as LOST at once; this bounds how late the
    watchers hear of it."""
