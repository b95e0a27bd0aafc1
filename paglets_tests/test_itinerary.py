"""Section 10, itineraries: route plans that live in paglet state and travel with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

import paglets
from paglets import (
    EXECUTE_ON_ARRIVAL,
    EXECUTE_ON_DEFAULT,
    EXECUTE_ON_DISPATCH,
    ItineraryAgentMixin,
    ItineraryPlan,
    ItineraryTask,
    Paglet,
    PagletContext,
    PagletState,
    TaskItineraryPlan,
    from_cbor,
    to_cbor,
)


@dataclass
class TourState(PagletState):
    itinerary: ItineraryPlan = field(default_factory=ItineraryPlan)
    done: list[str] = field(default_factory=list)


@dataclass
class TaskTourState(PagletState):
    route: TaskItineraryPlan = field(default_factory=TaskItineraryPlan)


class Tourist(ItineraryAgentMixin, Paglet[TourState]):
    State = TourState

    def execute_itinerary_task(self, task: ItineraryTask, phase: str, event: Any = None) -> Any:
        self.state.done.append(f"{task.name}@{phase}")
        return task.args.get("result", task.name)


class TaskTourist(ItineraryAgentMixin, Paglet[TaskTourState]):
    State = TaskTourState
    itinerary_attr = "route"

    def execute_itinerary_task(self, task: ItineraryTask, phase: str, event: Any = None) -> Any:
        return (task.name, phase, event)


class RecordingHost:
    """The two host operations ``dispatch_to`` needs, recording what the plan looked like then."""

    def __init__(self, plan_of: Any) -> None:
        self.plan_of, self.calls = plan_of, []

    def resolve_url(self, name_or_url: str) -> str:
        return f"http://{name_or_url}:1"

    def dispatch(self, agent_id: str, target: Any) -> str:
        plan = self.plan_of()
        self.calls.append((agent_id, target, plan.current_location, list(plan.visited_destinations), plan.current_index))
        return f"proxy@{target}"


def attached(paglet: Paglet[Any]) -> RecordingHost:
    host = RecordingHost(paglet.get_itinerary)  # type: ignore[attr-defined]
    paglet._context = PagletContext(host, paglet.agent_id)  # type: ignore[arg-type]
    return host


# -- ItineraryPlan ---------------------------------------------------------------------------------


def test_a_plan_walks_its_route_then_completes() -> None:
    plan = ItineraryPlan(["a", "b", "c"])
    assert plan.get_destination_count() == 3 and plan.get_remaining_destination_count() == 3
    assert (plan.get_first_destination(), plan.get_last_destination()) == ("a", "c")
    assert plan.get_current_location() is None and not plan.completed
    seen = []
    while (target := plan.advance()) is not None:
        seen.append(target)
        assert plan.get_current_location() == target
    assert seen == ["a", "b", "c"]
    assert plan.visited_destinations == ["a", "b", "c"]
    assert plan.completed and plan.get_remaining_destination_count() == 0
    assert plan.next_destination() is None and plan.advance() is None


def test_next_destination_does_not_move_the_plan() -> None:
    plan = ItineraryPlan(["a", "b"])
    assert plan.next_destination() == "a" and plan.next_destination() == "a"
    assert plan.current_index == 0 and plan.visited_destinations == []


def test_an_empty_plan_is_completed_on_first_advance() -> None:
    plan = ItineraryPlan()
    assert plan.get_first_destination() is None and plan.get_last_destination() is None
    assert plan.advance() is None and plan.completed


def test_a_circular_plan_loops_and_counts_loops() -> None:
    plan = ItineraryPlan(["a", "b"], circular=True)
    seen = [plan.advance() for _ in range(7)]
    assert seen == ["a", "b", "a", "b", "a", "b", "a"]
    assert plan.get_loop_count() == 3 and not plan.completed
    assert plan.visited_destinations == seen


def test_an_empty_circular_plan_does_not_spin() -> None:
    plan = ItineraryPlan([], circular=True)
    assert plan.next_destination() is None and plan.advance() is None and plan.completed


def test_skip_next() -> None:
    plan = ItineraryPlan(["a", "b", "c"])
    plan.skip_next()
    assert plan.advance() == "b"
    plan.skip_next()
    assert plan.advance() is None and plan.visited_destinations == ["b"]
    plan.skip_next()  # at the end: nothing to skip
    assert plan.current_index == 3


def test_skip_next_wraps_on_a_circular_plan() -> None:
    plan = ItineraryPlan(["a", "b"], circular=True)
    plan.advance(), plan.advance()
    plan.skip_next()  # skips "a" of the second loop
    assert plan.get_loop_count() == 1
    assert plan.advance() == "b"


def test_add_destinations_at_the_end_at_an_index_and_after_another() -> None:
    plan = ItineraryPlan(["a", "c"])
    assert plan.add_next_destination("d")
    assert plan.add_next_destination("b", after="a")
    assert plan.add_next_destination("start", index=0)
    assert plan.get_destinations() == ["start", "a", "b", "c", "d"]
    assert not plan.add_next_destination("x", after="nowhere")
    assert not plan.add_next_destination("x", index=99)
    assert not plan.add_next_destination("x", index=-1)
    assert not plan.add_next_destination("")
    assert plan.get_destinations() == ["start", "a", "b", "c", "d"]


def test_duplicates_are_allowed_unless_asked_otherwise() -> None:
    plan = ItineraryPlan(["a"])
    assert plan.add_next_destination("a")
    assert not plan.add_next_destination_if_not_duplicated("a")
    assert plan.add_next_destination_if_not_duplicated("b")
    assert plan.get_destinations() == ["a", "a", "b"]


def test_edits_behind_the_current_position_keep_the_next_destination() -> None:
    plan = ItineraryPlan(["a", "b", "c", "d"])
    plan.advance(), plan.advance()  # visited a, b; next is c
    assert plan.add_next_destination("early", index=0)
    assert plan.next_destination() == "c"
    assert plan.remove_destination("a")
    assert plan.next_destination() == "c"
    assert plan.get_remaining_destination_count() == 2


def test_edits_at_the_current_position_change_the_next_destination() -> None:
    plan = ItineraryPlan(["a", "b", "c"])
    plan.advance()  # next is b
    assert plan.add_next_destination("detour", index=plan.current_index)
    assert plan.next_destination() == "detour"
    assert plan.remove_destination_at(plan.current_index)
    assert plan.next_destination() == "b"
    assert plan.remove_destination("b")
    assert plan.next_destination() == "c"


def test_remove_destination() -> None:
    plan = ItineraryPlan(["a", "b", "a"])
    assert plan.remove_destination("a")
    assert plan.get_destinations() == ["b", "a"]
    assert not plan.remove_destination("zzz")
    assert not plan.remove_destination_at(2) and not plan.remove_destination_at(-1)
    assert plan.remove_destination_at(1) and plan.get_destinations() == ["b"]


def test_an_immutable_route_refuses_edits_but_still_advances() -> None:
    plan = ItineraryPlan(["a", "b"])
    plan.set_immutable()
    assert not plan.add_next_destination("c")
    assert not plan.add_next_destination_if_not_duplicated("c")
    assert not plan.remove_destination("a") and not plan.remove_destination_at(0)
    assert plan.get_destinations() == ["a", "b"]
    assert plan.advance() == "a"


def test_get_destinations_is_a_copy() -> None:
    plan = ItineraryPlan(["a"])
    plan.get_destinations().append("b")
    assert plan.destinations == ["a"]


# -- dispatch_next and the mixin -------------------------------------------------------------------


def test_dispatch_next_advances_before_dispatching() -> None:
    """The state that travels is captured during the dispatch, so it must already point ahead."""
    plan = ItineraryPlan(["beta", "gamma"])
    snapshots = []

    class Agent:
        def dispatch_to(self, target: str) -> str:
            snapshots.append((target, plan.current_location, list(plan.visited_destinations), plan.completed))
            return f"proxy@{target}"

    agent = Agent()
    assert plan.dispatch_next(agent) == "proxy@beta"
    assert plan.dispatch_next(agent) == "proxy@gamma"
    assert plan.dispatch_next(agent) is None
    assert snapshots == [("beta", "beta", ["beta"], False), ("gamma", "gamma", ["beta", "gamma"], False)]
    assert plan.completed


def test_go_to_next_destination_dispatches_a_real_paglet_through_its_context() -> None:
    tourist = Tourist(TourState(ItineraryPlan(["beta", "gamma"])), agent_id="t1")
    host = attached(tourist)
    assert tourist.go_to_next_destination() == "proxy@http://beta:1"
    assert tourist.go_to_next_destination() == "proxy@http://gamma:1"
    assert tourist.go_to_next_destination() is None
    assert host.calls == [
        ("t1", "http://beta:1", "beta", ["beta"], 1),
        ("t1", "http://gamma:1", "gamma", ["beta", "gamma"], 2),
    ]
    assert tourist.get_itinerary().completed


def test_execute_itinerary_tasks_runs_the_current_locations_tasks() -> None:
    plan = TaskItineraryPlan(["beta"])
    plan.add_task_for_destination("beta", ItineraryTask("measure", EXECUTE_ON_ARRIVAL, {"result": 42}))
    plan.add_task_for_destination("beta", ItineraryTask("pack", EXECUTE_ON_DISPATCH))
    plan.add_default_task(ItineraryTask("log", EXECUTE_ON_DEFAULT))
    tourist = Tourist(TourState(plan))
    assert tourist.execute_itinerary_tasks(EXECUTE_ON_ARRIVAL) == ["log"]  # no location yet: only defaults apply
    tourist.state.done.clear()
    plan.advance()
    assert tourist.execute_itinerary_tasks(EXECUTE_ON_ARRIVAL) == ["log", 42]
    assert tourist.execute_itinerary_tasks(EXECUTE_ON_DISPATCH) == ["pack"]
    assert tourist.state.done == ["log@arrival", "measure@arrival", "pack@dispatch"]


def test_execute_itinerary_tasks_on_a_plain_plan_runs_nothing() -> None:
    tourist = Tourist(TourState(ItineraryPlan(["a"])))
    tourist.get_itinerary().advance()
    assert tourist.execute_itinerary_tasks(EXECUTE_ON_ARRIVAL) == [] and tourist.state.done == []


def test_the_mixin_reads_the_plan_from_the_named_state_field() -> None:
    plan = TaskItineraryPlan(["x"])
    plan.add_task_for_destination("x", ItineraryTask("t", EXECUTE_ON_ARRIVAL))
    tourist = TaskTourist(TaskTourState(plan))
    assert tourist.get_itinerary() is plan
    plan.advance()
    assert tourist.execute_itinerary_tasks(EXECUTE_ON_ARRIVAL, event="ev") == [("t", EXECUTE_ON_ARRIVAL, "ev")]


def test_a_task_without_an_implementation_says_so() -> None:
    class Lazy(ItineraryAgentMixin):
        state = TourState(TaskItineraryPlan(["x"], destination_tasks={"x": [ItineraryTask("chore")]}))

    lazy = Lazy()
    lazy.get_itinerary().advance()
    with pytest.raises(NotImplementedError, match="chore"):
        lazy.execute_itinerary_tasks(EXECUTE_ON_ARRIVAL)


# -- TaskItineraryPlan -----------------------------------------------------------------------------


def test_default_tasks_need_the_default_execution_and_are_not_duplicated() -> None:
    plan = TaskItineraryPlan()
    log = ItineraryTask("log", EXECUTE_ON_DEFAULT)
    assert plan.add_default_task(log)
    assert not plan.add_default_task(ItineraryTask("log", EXECUTE_ON_DEFAULT))
    assert not plan.add_default_task(ItineraryTask("arrive", EXECUTE_ON_ARRIVAL))
    assert plan.default_tasks == [log]
    assert plan.remove_default_task(log) and not plan.remove_default_task(log)


def test_a_default_task_given_for_a_destination_goes_to_the_defaults() -> None:
    plan = TaskItineraryPlan()
    task = ItineraryTask("log", EXECUTE_ON_DEFAULT)
    assert plan.add_task_for_destination("a", task)
    assert plan.default_tasks == [task] and plan.get_tasks_for_destination("a") == []
    assert not plan.add_task_for_destination("", ItineraryTask("x"))


def test_tasks_for_phase() -> None:
    plan = TaskItineraryPlan()
    default = ItineraryTask("default", EXECUTE_ON_DEFAULT)
    arrive, leave = ItineraryTask("arrive", EXECUTE_ON_ARRIVAL), ItineraryTask("leave", EXECUTE_ON_DISPATCH)
    plan.add_default_task(default)
    assert plan.add_next_destination_with_task("a", arrive)
    plan.add_task_for_destination("a", leave)
    assert plan.get_destinations() == ["a"]
    assert plan.tasks_for_phase("a", EXECUTE_ON_ARRIVAL) == [default, arrive]  # defaults first
    assert plan.tasks_for_phase("a", EXECUTE_ON_DISPATCH) == [leave]  # defaults off on dispatch by default
    assert plan.tasks_for_phase("b", EXECUTE_ON_ARRIVAL) == [default]
    assert plan.tasks_for_phase(None, EXECUTE_ON_DISPATCH) == []
    plan.execute_default_on_arrival, plan.execute_default_on_dispatch = False, True
    assert plan.tasks_for_phase("a", EXECUTE_ON_ARRIVAL) == [arrive]
    assert plan.tasks_for_phase("a", EXECUTE_ON_DISPATCH) == [default, leave]
    assert plan.tasks_for_phase("a", paglets.EXECUTE_ON_REVERTING) == []
    plan.execute_default_on_reverting = True
    assert plan.tasks_for_phase("a", paglets.EXECUTE_ON_REVERTING) == [default]


def test_remove_tasks_for_a_destination() -> None:
    plan = TaskItineraryPlan()
    one, two = ItineraryTask("one"), ItineraryTask("two")
    plan.add_task_for_destination("a", one)
    plan.add_task_for_destination("a", two)
    assert plan.get_tasks_for_destination("a") == [one, two]
    plan.get_tasks_for_destination("a").clear()  # a copy
    assert plan.remove_task_for_destination("a", one) and not plan.remove_task_for_destination("a", one)
    assert plan.remove_task_for_destination("a", two)
    assert "a" not in plan.destination_tasks
    plan.add_task_for_destination("b", one)
    assert plan.remove_all_tasks_for_destination("b") and not plan.remove_all_tasks_for_destination("b")


def test_an_immutable_task_route_refuses_a_destination_with_its_task() -> None:
    plan = TaskItineraryPlan(["a"])
    plan.set_immutable()
    assert not plan.add_next_destination_with_task("b", ItineraryTask("t"))
    assert plan.destination_tasks == {} and plan.get_destinations() == ["a"]


def test_task_defaults() -> None:
    task = ItineraryTask("t")
    assert (task.execution, task.args) == (EXECUTE_ON_ARRIVAL, {})
    assert ItineraryTask("t").args is not task.args


# -- plans travel inside paglet state --------------------------------------------------------------


def _busy_task_plan() -> TaskItineraryPlan:
    plan = TaskItineraryPlan(["a", "b", "c"], circular=True, execute_default_on_dispatch=True)
    plan.add_default_task(ItineraryTask("log", EXECUTE_ON_DEFAULT, {"level": 2}))
    plan.add_task_for_destination("b", ItineraryTask("measure", EXECUTE_ON_ARRIVAL, {"sensors": ("t", "h"), "n": 3}))
    for _ in range(4):
        plan.advance()
    plan.set_immutable()
    return plan


@pytest.mark.parametrize("via", ["cbor", "json"])
def test_plans_round_trip_inside_paglet_state(via: str) -> None:
    plain = ItineraryPlan(["x", "y"])
    plain.advance(), plain.advance(), plain.advance()
    for state in (TourState(plain, done=["a"]), TaskTourState(_busy_task_plan()), TourState(_busy_task_plan())):
        if via == "cbor":
            back = from_cbor(to_cbor(state))
        else:
            tree = paglets._json_loads(paglets._json_dumps(paglets._wire_encode(state)))
            back = paglets._wire_decode(tree, paglets._wire_resolver(()))
        assert type(back) is type(state) and back == state
        plan = getattr(back, "route", None) or back.itinerary
        assert type(plan) is type(getattr(state, "route", None) or state.itinerary)


def test_a_plan_goes_on_where_it_left_off_after_travelling() -> None:
    state = TourState(ItineraryPlan(["a", "b", "c"]))
    state.itinerary.advance()
    back = from_cbor(to_cbor(state))
    assert back.itinerary.advance() == "b"
    assert back.itinerary.visited_destinations == ["a", "b"]
    back.itinerary.add_next_destination("d")
    assert [back.itinerary.advance(), back.itinerary.advance(), back.itinerary.advance()] == ["c", "d", None]
    assert back.itinerary.completed
