"""A loader as a node of a fleet, in its pure parts: its labels, the view of a model as this node
sees it, and which of its placements it should hold (level-triggered against the placer's
generation). The whole node, with real Triton and registry, is tested in
tests/integration/test_fleet.py."""

from __future__ import annotations

import pytest

from modelplane.common.errors import InvalidArgument
from modelplane.common.types import Model, ModelSpec, ModelState, ModelStatus, Task
from modelplane.loader.node import parse_labels
from modelplane.loader.reconcile import PlacementDesire, plan_reconcile
from modelplane.loader.states import PlacementStates, node_view
from modelplane.registry.fleet import Placement, PlacementStatus


def test_labels_are_read_from_key_value_pairs_and_bad_ones_are_refused_with_the_fix() -> None:
    assert parse_labels("gpu=h100, zone=a,,") == {"gpu": "h100", "zone": "a"}
    assert parse_labels("") == {}
    with pytest.raises(InvalidArgument) as refused:
        parse_labels("gpu")
    assert "MODELPLANE_NODE_LABELS='gpu'" in refused.value.message and "gpu=h100,zone=a" in refused.value.message
    with pytest.raises(InvalidArgument, match="label value"):
        parse_labels("zone=a b")


def _model(name: str, state: ModelState = ModelState.READY) -> Model:
    return Model(
        name=name,
        version=1,
        spec=ModelSpec(name=name, task=Task.EMBEDDING, source_uri="/m"),
        status=ModelStatus(state=state),
    )


def _placement(name: str, state: ModelState, *, generation: int = 1, observed: int = 0, **status: object) -> Placement:
    return Placement(
        model_name=name,
        node_id="node-1",
        version=1,
        generation=generation,
        status=PlacementStatus(state=state, observed_generation=observed, version=1, **status),
    )


class _Node:
    node_id = "node-1"
    incarnation = 3


class _Registry:
    def __init__(self, models: list[Model], placements: list[Placement]) -> None:
        self.models = models
        self.placements = placements

    async def list_models(self) -> list[Model]:
        return self.models

    async def list_placements(self, model_names: object = (), node_ids: object = ()) -> list[Placement]:
        return self.placements


def test_a_model_as_this_node_sees_it_has_its_copys_state_of_this_incarnation_only() -> None:
    model = _model("m", ModelState.READY)  # READY on some node
    assert node_view(model, None, 3).state == ModelState.REGISTERED
    ours = _placement("m", ModelState.LOADING, incarnation=3)
    assert node_view(model, ours, 3).state == ModelState.LOADING
    # Recorded by this node's previous process: it holds nothing here now.
    earlier = _placement("m", ModelState.READY, incarnation=2)
    assert node_view(model, earlier, 3).state == ModelState.REGISTERED


async def test_a_node_holds_its_placements_but_not_what_it_evicted_or_failed_at_this_generation() -> None:
    models = [_model(n) for n in ("placed", "evicted", "asked-again", "failed", "elsewhere")]
    placements = [
        _placement("placed", ModelState.REGISTERED),
        _placement("evicted", ModelState.STAGED, observed=1, evicted=True, incarnation=3),
        _placement("asked-again", ModelState.STAGED, generation=2, observed=1, evicted=True, incarnation=3),
        _placement("failed", ModelState.FAILED, observed=1, incarnation=3),
    ]
    registry = _Registry(models, placements)
    desire = PlacementDesire(registry, PlacementStates(registry, _Node()))  # type: ignore[arg-type]
    view = await desire.read()
    assert view.owned == {"placed", "evicted", "asked-again", "failed"}
    assert view.wanted == {"placed", "asked-again"}
    # "elsewhere" is READY on another node: this node neither loads nor records it, and its Triton
    # lets it go (keeping the repository entry) if it still held it.
    plan = plan_reconcile(view, {"elsewhere": "READY", "evicted": "READY"}, set(), lambda _: 0.0)
    assert sorted(load.model.name for load in plan.loads) == ["asked-again", "placed"]
    assert [(u.name, getattr(u, "remove_entry", None)) for u in plan.unloads] == [
        ("elsewhere", False),
        ("evicted", None),
    ]


class _Recording(_Registry):
    def __init__(self, placement: Placement) -> None:
        super().__init__([], [placement])
        self.steps: list[tuple[int, ModelState]] = []

    async def transition_placement(
        self, placement: Placement, incarnation: int, to_state: ModelState, message: str = "", **_: object
    ) -> tuple[Placement, Model]:
        self.steps.append((incarnation, to_state))
        status = placement.status.model_copy(update={"state": to_state, "incarnation": incarnation})
        return placement.model_copy(update={"status": status}), _model(placement.model_name, to_state)


async def test_a_restarted_node_takes_over_its_copy_along_legal_steps_to_where_its_load_goes_on() -> None:
    # The copy was READY under incarnation 2; incarnation 3 finds its files cached and stages it at
    # once. Found by `MODELPLANE_NODES=2 modelplane up` with node-1 SIGKILLed: REGISTERED -> STAGED
    # was refused (STALE_TRANSITION) and the copy was recorded FAILED.
    registry = _Recording(_placement("m", ModelState.READY, incarnation=2))
    states = PlacementStates(registry, _Node())  # type: ignore[arg-type]
    seen = await states.transition(_model("m", ModelState.REGISTERED), ModelState.STAGED, "staged")
    assert registry.steps == [(3, ModelState.REGISTERED), (3, ModelState.VERIFYING), (3, ModelState.STAGED)]
    assert seen.state == ModelState.STAGED


async def test_a_copy_new_to_a_node_whose_cache_holds_it_is_staged_along_legal_steps() -> None:
    # Found by test_fleet's restarted node given a model it held before: REGISTERED -> STAGED was
    # refused and the copy recorded FAILED.
    registry = _Recording(_placement("m", ModelState.REGISTERED))
    states = PlacementStates(registry, _Node())  # type: ignore[arg-type]
    await states.transition(_model("m", ModelState.REGISTERED), ModelState.STAGED, "staged")
    assert registry.steps == [(3, ModelState.VERIFYING), (3, ModelState.STAGED)]
