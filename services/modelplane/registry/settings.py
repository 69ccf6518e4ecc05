"""Settings of the registry service (env prefix MODELPLANE_REGISTRY_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
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
    """The longest the registry waits between two looks for nodes whose lease has lapsed (seconds).
    It records a node LOST, and tells watchers and the placer, when the node's lease runs out (it
    sleeps until the earliest expiry, and wakes when a node registers); this bounds each sleep, for
    a node registered through another replica while the change feed is down."""
    placer: bool = True
    """Whether this replica runs a placer. Every replica may: one at a time places (the one that
    holds the "placer" lease), the others take over when it stops renewing."""
    placer_interval_seconds: float = Field(default=2.0, gt=0)
    """How often the placer plans when nothing changes (seconds); also how often it renews its lease
    and how often the other replicas try to take it."""
    placer_debounce_seconds: float = Field(default=0.2, ge=0)
    """After a change the placer waits this long for more before it plans (seconds); not after a
    node is lost, whose copies it places elsewhere at once."""
    placer_lease_seconds: float = Field(default=10.0, gt=0)
    """How long the placer's leadership lasts without renewal (seconds): a replica that stops
    renewing is replaced within this plus one interval. At least three intervals."""
    placer_strategy: Literal["spread", "binpack"] = "spread"
    """Where new copies go among nodes with room: spread (the most memory left) or binpack (the
    least left)."""
    placer_copy_capacity_rps: float = Field(default=20.0, gt=0)
    """Requests/s one copy of a model serves: a model gets ceil(rate / this) copies as its
    forecast rate rises (at most one per node). A copy on a CPU node serves far fewer than one on
    a GPU; set it to what one of this fleet's copies sustains."""
    placer_min_copy_age_seconds: float = Field(default=300.0, ge=0)
    """No copy younger than this is removed because demand fell (seconds; ModelMesh's minimum
    churn age): a burst does not load and unload the same copy."""
    placer_forecast_horizon_seconds: float = Field(default=300.0, gt=0)
    """The horizon over which request rates are forecast for placing copies ahead of requests
    (seconds; the loader's preloading horizon)."""

    @model_validator(mode="after")
    def _lease_outlasts_rounds(self) -> RegistrySettings:
        if self.placer_lease_seconds < 3 * self.placer_interval_seconds:
            raise ValueError(
                f"placer_lease_seconds ({self.placer_lease_seconds:g}) must be at least three times "
                f"placer_interval_seconds ({self.placer_interval_seconds:g}), so the leader renews in time"
            )
        return self
