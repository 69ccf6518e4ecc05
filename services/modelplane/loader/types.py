"""Domain types of the loader's API, shared by its handler and its client."""

from __future__ import annotations

from dataclasses import dataclass, field

from modelplane.common.types import LoadProgress, Model, PhaseDuration


@dataclass(frozen=True)
class LoadUpdate:
    """One report of a load: progress, and on the last one (done) the model and phase timings."""

    progress: LoadProgress
    done: bool = False
    model: Model | None = None
    phase_durations: list[PhaseDuration] = field(default_factory=list)
