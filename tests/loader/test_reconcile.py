"""Reconciliation's plan, a pure function: what one node does to converge, from what its desired
source says and what its Triton holds."""

from __future__ import annotations

from modelplane.common.types import (
    DesiredState,
    Model,
    ModelSpec,
    ModelState,
    ModelStatus,
    Priority,
    ServingProfile,
    Task,
)
from modelplane.loader.decisions import Discard, Load, Reset, Unload
from modelplane.loader.reconcile import NodeView, plan_reconcile


def model(name: str, state: ModelState, desired: DesiredState = DesiredState.LOADED, **spec: object) -> Model:
    staged = state not in (ModelState.REGISTERED, ModelState.FETCHING, ModelState.VERIFYING, ModelState.CONVERTING)
    return Model(
        spec=ModelSpec(name=name, task=Task.EMBEDDING, source_uri="/x", **spec),
        desired_state=desired,
        status=ModelStatus(state=state, profile=ServingProfile() if staged else None),
    )


def view(*models: Model, owned: set[str] | None = None) -> NodeView:
    by_name = {m.name: m for m in models}
    owned_names = frozenset(by_name if owned is None else owned)
    wanted = frozenset(n for n, m in by_name.items() if m.desired_state == DesiredState.LOADED and n in owned_names)
    return NodeView(models=by_name, owned=owned_names, wanted=wanted)


def never_used(name: str) -> float:
    return 0.0


def test_work_cut_off_is_reset_to_what_its_files_allow_then_loaded_again() -> None:
    plan = plan_reconcile(view(model("a", ModelState.LOADING), model("b", ModelState.FETCHING)), {}, set(), never_used)
    assert [(r.model.name, r.to_state) for r in plan.resets] == [
        ("a", ModelState.STAGED),
        ("b", ModelState.REGISTERED),
    ]
    assert plan.resets[0].message == "loading was interrupted (found by reconciliation)"
    assert [load.model.name for load in plan.loads] == ["a", "b"]


def test_what_the_residency_is_working_on_is_left_alone() -> None:
    plan = plan_reconcile(view(model("a", ModelState.LOADING)), {"a": "LOADING"}, {"a"}, never_used)
    assert plan == type(plan)()


def test_a_model_this_node_does_not_own_is_never_reset_nor_recorded() -> None:
    """With placements, another node may be loading it: its working state is not ours to reset."""
    models = (model("mine", ModelState.FETCHING), model("theirs", ModelState.FETCHING), model("old", ModelState.READY))
    plan = plan_reconcile(view(*models, owned={"mine"}), {"old": "READY"}, set(), never_used)
    assert [r.model.name for r in plan.resets] == ["mine"]
    assert [load.model.name for load in plan.loads] == ["mine"]
    # Held in this Triton but not this node's: out of Triton, no record written, entry kept.
    assert plan.unloads == [Discard("old", unload=True, remove_entry=False)]


def test_a_recorded_ready_that_triton_does_not_hold_is_loaded_or_reset() -> None:
    wanted, unwanted = model("w", ModelState.READY), model("u", ModelState.READY, DesiredState.UNLOADED)
    plan = plan_reconcile(view(wanted, unwanted), {}, set(), never_used)
    assert plan.resets == [Reset(unwanted, ModelState.STAGED, "not loaded in Triton (found by reconciliation)")]
    assert plan.loads == [Load(wanted, "reconcile")]


def test_loads_most_important_then_most_recent_first_and_failed_models_wait_for_a_person() -> None:
    models = (
        model("low", ModelState.STAGED, priority=Priority.LOW),
        model("old", ModelState.STAGED),
        model("recent", ModelState.STAGED),
        model("pinned", ModelState.STAGED, priority=Priority.PINNED),
        model("broken", ModelState.FAILED),
    )
    used = {"old": 100.0, "recent": 200.0}
    plan = plan_reconcile(view(*models), {}, set(), lambda name: used.get(name, 0.0))
    assert [load.model.name for load in plan.loads] == ["pinned", "recent", "old", "low"]


def test_triton_holding_what_nobody_wants_is_unloaded_and_unknown_entries_removed() -> None:
    models = (model("keep", ModelState.READY), model("drop", ModelState.READY, DesiredState.UNLOADED))
    in_triton = {"keep": "READY", "drop": "READY", "deleted": "READY", "gone": "UNAVAILABLE"}
    plan = plan_reconcile(view(*models), in_triton, set(), never_used)
    assert plan.unloads == [Unload("drop", "reconcile"), Discard("deleted", unload=True), Discard("gone", unload=False)]
    assert plan.result.unloaded == ["drop", "deleted"] and plan.result.loaded == []
