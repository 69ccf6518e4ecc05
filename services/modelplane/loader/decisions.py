"""What the loader's deciding parts ask of the node's residency, as plain values.

Admission into the memory budget, the periodic budget work, reconciliation and the registry watch
each return decisions; `NodeResidency.carry_out` is the one place that acts on them, so every
load, every unload and every state write runs there.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelplane.common.types import Model, ModelState


@dataclass(frozen=True)
class Unload:
    """Unload a model this node holds, and record why."""

    name: str
    # "eviction" (room for another model, or back within budget), "idle", "quota" or "reconcile".
    reason: str
    # The model the eviction makes room for ("" when the budget was over), or the quota refusal.
    detail: str = ""


@dataclass(frozen=True)
class Preload:
    """Load a model before anyone asks for it. The budget already holds a claim for its bytes,
    which the residency gives back when the preload ends or stands down."""

    name: str


@dataclass(frozen=True)
class Load:
    """Load a model this node should hold (reconciliation, or a model registered to be loaded)."""

    model: Model
    reason: str  # "reconcile" or "registered"


@dataclass(frozen=True)
class Reset:
    """Put a model this node owns, and is not working on, back to the state its files support:
    work on it was cut off (a crash, a Triton restart) or its recorded READY is not true."""

    model: Model
    to_state: ModelState
    message: str


@dataclass(frozen=True)
class Discard:
    """Take a model out of this node's Triton without writing any state: the catalogue does not
    know it (it was deleted), so there is nothing to record."""

    name: str
    unload: bool  # loaded in Triton: unload it there
    remove_entry: bool = True  # remove its entry from Triton's model repository


Decision = Unload | Preload | Load | Reset | Discard
