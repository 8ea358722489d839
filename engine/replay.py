"""Replay: which recorded step a step request is, and when replayed code has diverged.

A step request is matched to the run's history by its id and its *place*, never by the order in
which the event loop happens to schedule concurrent tasks. The place of a request says what came
just before it in the same branch of the function (an asyncio task: the function's own, or one
that ``asyncio.gather``/``create_task`` started):

- ``">k"``: the branch asked for step ``k`` just before (``">"``: this is the function's first);
- ``"+k"``: the first step of a branch started after its parent asked for step ``k`` (``"+"``:
  started before the parent asked for any).

Given the same step results, deterministic code asks for the same steps at the same places in
every execution, however its branches interleave; so ``(id, place)`` names a step across
executions. Several requests with the same id and place (``gather`` over a loop of the same id)
are told apart by the order in which they are asked, which for branches that gather started
together is the order of their creation. Keys (``fetch``, ``fetch:1``...) only need to be unique:
a new step takes its id as its key, or the first ``id:n`` not taken, and a key is never parsed.

Divergence is reported (:class:`DeterminismError`) only when it is provable:

- a branch asks, right after step ``k``, for a step that has no record, while the run recorded a
  different step right after ``k`` in that branch: the branch's code is sequential, so in an
  unchanged function it would ask for the recorded one (checked before the new step runs);
- a step is asked for at a recorded place with another kind (``run`` where a ``sleep`` was);
- the function returned while a recorded step was never asked for.

Steps recorded before places were stored (schema version 9) are matched as they were recorded:
by the per-id counter in the order of the requests.

Patch markers (``ctx.patched``, kind ``patch``) stand beside the steps, not among them: they are
never asked for as steps, never change a place, and :meth:`History.patched` alone reads them.
A patch point at place ``p`` is new code's for a run when a marker of that patch is recorded at
``p``, old code's when the run had recorded a step at ``p`` before this execution began (the old
code went on from there), and new code's otherwise (the run reaches ``p`` for the first time; a
marker is recorded, with the steps after it or before them).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .errors import DeterminismError

PATCH = "patch"  # the kind of a patch marker (engine.records.StepKind.PATCH)

# The last step asked for in this branch of the run, with the task that asked for it.
_last_step: ContextVar[tuple[str, asyncio.Task[Any] | None] | None] = ContextVar(
    "engine_last_step", default=None
)


def start_branch() -> None:
    """Marks the current task as the function's own branch, before it asks for any step."""
    _last_step.set(("", asyncio.current_task()))


def current_place(task: asyncio.Task[Any] | None = None) -> str:
    """The place of a step asked for now, in the current branch (see the module docstring).
    ``task``: the current task, when the caller has it at hand."""
    last = _last_step.get()
    if last is None:
        return "+"
    key, branch = last
    return (">" if branch is (task or asyncio.current_task()) else "+") + key


def describe(place: str) -> str:
    """A place in words, for error messages."""
    after = place[1:]
    if place.startswith(">"):
        return f"after step {after!r}" if after else "as the function's first step"
    return (
        f"as the first step of a branch started after step {after!r}"
        if after
        else ("as the first step of a branch started before any step")
    )


@dataclass
class Recorded:
    """What the history needs to know of a recorded step."""

    key: str
    kind: str
    position: int
    step_id: str | None  # None: recorded before places were stored
    place: str | None


@dataclass
class Match:
    """Where a step request falls: its key and position, and its record if it has one."""

    key: str
    position: int
    place: str
    recorded: bool


@dataclass
class History:
    """The run's recorded steps, and which of them this execution has asked for."""

    recorded: dict[str, Recorded]
    asked: set[str] = field(default_factory=set)
    new_keys: list[str] = field(default_factory=list)  # asked for with no record, in order
    _by_place: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _after: dict[str, str] = field(default_factory=dict)  # ">k" place -> recorded key there
    _requests: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _suffixes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _next_position: int = 0
    _replayed_places: frozenset[str] = frozenset()
    _recorded_at_start: int = 0
    _patches: dict[tuple[str, str], str] = field(default_factory=dict)  # (id, place) -> key
    _marker_keys: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        positions = [s.position for s in self.recorded.values()]
        for marker in [s for s in self.recorded.values() if s.kind == PATCH]:
            del self.recorded[marker.key]
            self._add_marker(marker)
        by_place: dict[tuple[str, str], list[Recorded]] = defaultdict(list)
        for step in self.recorded.values():
            if step.step_id is not None and step.place is not None:
                by_place[(step.step_id, step.place)].append(step)
                if step.place.startswith(">"):
                    self._after[step.place] = step.key
        self._by_place = {
            place: [s.key for s in sorted(steps, key=lambda s: s.position)]
            for place, steps in by_place.items()
        }
        self._next_position = max(positions, default=-1) + 1
        self._replayed_places = frozenset(self._places())
        self._recorded_at_start = len(self.recorded)

    def ask(self, step_id: str, kind: str, task: asyncio.Task[Any] | None = None) -> Match:
        """Matches a request to its record, or gives it a new key; raises DeterminismError
        when the request proves that the function changed. ``task``: the current task (looked
        up if not given)."""
        task = task or asyncio.current_task()
        place = current_place(task)
        count = self._requests[step_id]
        self._requests[step_id] = count + 1
        key = self._match(step_id, place, count)
        if key is None:
            self._check_new(step_id, place)
            key = self._new_key(step_id)
            self.new_keys.append(key)
            match = Match(key, self._next_position, place, recorded=False)
            self._next_position += 1
        else:
            step = self.recorded[key]
            if step.kind != kind:
                raise DeterminismError(
                    f"step {key!r} was recorded as a {step.kind} step, but the code now asks for "
                    f"a {kind} step with that id: the function changed while the run was in "
                    "flight",
                    recorded=key,
                    asked=step_id,
                )
            match = Match(key, step.position, place, recorded=True)
        self.asked.add(key)
        _last_step.set((key, task))
        return match

    def _match(self, step_id: str, place: str, count: int) -> str | None:
        for key in self._by_place.get((step_id, place), ()):
            if key not in self.asked:
                return key
        legacy = step_id if count == 0 else f"{step_id}:{count}"
        step = self.recorded.get(legacy)
        if step is not None and step.place is None and legacy not in self.asked:
            return legacy
        return None

    def _check_new(self, step_id: str, place: str) -> None:
        recorded = self._after.get(place)
        if recorded is not None and recorded not in self.asked:
            raise DeterminismError(
                f"{describe(place)} the run recorded step {recorded!r}, but the code now asks "
                f"for step {step_id!r}{self._elsewhere(step_id)}: the function changed while "
                "the run was in flight",
                recorded=recorded,
                asked=step_id,
            )

    def _elsewhere(self, step_id: str) -> str:
        """Where a step of this id is recorded instead, if it is."""
        for step in self.recorded.values():
            if step.step_id == step_id and step.key not in self.asked and step.place:
                return f" (recorded {describe(step.place)})"
        return ""

    def _new_key(self, step_id: str) -> str:
        n = self._suffixes[step_id]  # counters below n are taken already
        key = step_id if n == 0 else f"{step_id}:{n}"
        while key in self.recorded or key in self.asked or key in self._marker_keys:
            n += 1
            key = f"{step_id}:{n}"
        self._suffixes[step_id] = n
        return key

    def check_complete(self) -> None:
        """Called when the function returned: every recorded step must have been asked for,
        since the function will ask for nothing more."""
        missing = [s for s in self.recorded.values() if s.key not in self.asked]
        if not missing:
            return
        names = _names(s.key for s in sorted(missing, key=lambda s: s.position))
        instead = f" (it asked for new steps {_names(self.new_keys)})" if self.new_keys else ""
        raise DeterminismError(
            f"the function returned without asking for recorded steps {names}{instead}: the "
            "function changed while the run was in flight",
            recorded=min(missing, key=lambda s: s.position).key,
            asked=self.new_keys[0] if self.new_keys else None,
        )

    def remember(self, step: Recorded) -> None:
        """Adds a step recorded during this execution (it was asked for)."""
        if step.kind == PATCH:
            self._add_marker(step)
            return
        self.recorded[step.key] = step

    def _add_marker(self, marker: Recorded) -> None:
        self._marker_keys.add(marker.key)
        if marker.step_id is not None and marker.place is not None:
            self._patches[(marker.step_id, marker.place)] = marker.key

    def patched(self, patch_id: str) -> tuple[bool, Match | None]:
        """Whether the code at this point takes the path of patch ``patch_id`` (see the module
        docstring), and the marker to record when it is the run's first time here."""
        place = current_place()
        if (patch_id, place) in self._patches:
            return True, None
        if place in self._replayed_places:  # the old code went on from here
            return False, None
        key = self._new_key(patch_id)
        self._marker_keys.add(key)
        self._patches[(patch_id, place)] = key
        match = Match(key, self._next_position, place, recorded=False)
        self._next_position += 1
        return True, match

    def count(self) -> int:
        """How many distinct steps the run has recorded or asked for."""
        return self._recorded_at_start + len(self.new_keys)

    def tail_place(self) -> str:
        """The place after the most recent recorded step that no recorded step follows yet (the
        function's start if nothing is recorded): where the run counts the lines it logged
        after its last step, for the next execution to skip them (see RunLogger)."""
        followed = self._places()
        tails = [
            s for s in self.recorded.values() if s.place is not None and f">{s.key}" not in followed
        ]
        if not tails:
            return ">"
        return ">" + max(tails, key=lambda s: s.position).key

    def followed_places(self) -> set[str]:
        """The places a recorded step follows: code there ran to its end (see RunLogger)."""
        return self._places()

    def replayed_line(self, place: str) -> bool:
        """True if code at ``place`` ran to its end in an earlier execution: a step was recorded
        at ``place`` before this execution began, so the code before it had run."""
        return place in self._replayed_places

    def _places(self) -> set[str]:
        return {s.place for s in self.recorded.values() if s.place is not None}


def _names(keys: Iterable[str], most: int = 5) -> str:
    listed = list(keys)
    more = f" and {len(listed) - most} more" if len(listed) > most else ""
    return ", ".join(repr(key) for key in listed[:most]) + more
