"""Typed events: pydantic models of events' ``data``, checked where events come in and go out.

Where a schema acts (see docs/typed-events.md for why):

* sending (``app.send``, ``ctx.step.send_event``): an event is checked against the schema its
  app registers for its name (``Engine(event_schemas=...)``); a mismatch is refused with
  :class:`~engine.errors.InvalidEventError` and nothing is stored;
* running: a function whose trigger declares ``schema=`` receives ``ctx.event.data`` as the
  model. An event that reached it unchecked (by SQL, over HTTP, from an app without the schema)
  and does not validate fails the run at its start with
  :class:`~engine.errors.EventSchemaError`, before any step: the event is stored and visible,
  the failure is in ``get_run``, and nothing else is held up (routing, other runs);
* waiting: ``wait_for_event(..., schema=Model)`` returns the event with typed data, or raises
  ``StepError`` at the call site if the event that resolved the wait does not validate.

Validation is a pure function of the stored event and the code's model, so a replay validates
exactly as the first execution did while the model is unchanged.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, RootModel, ValidationError

from .context import Context
from .errors import ConfigurationError, EventSchemaError, InvalidEventError
from .events import Event

if TYPE_CHECKING:
    from .function import Function
    from .triggers import Trigger

# The event of a run started by ctx.step.invoke: its data is the invoke's data.
INVOKED = "engine/function.invoked"
# The event of a run started by a cron tick: {cron, scheduled_at, function_id}.
SCHEDULED = "engine/scheduled.timer"


def check_schema(schema: Any, what: str) -> type[BaseModel]:
    """Returns ``schema`` if it is a pydantic model of a JSON object (event data is one).

    Raises:
        ConfigurationError: anything else, saying what was given.
    """
    if not isinstance(schema, type) or not issubclass(schema, BaseModel):
        raise ConfigurationError(f"{what}: expected a pydantic model class, got {schema!r}")
    if issubclass(schema, RootModel):
        raise ConfigurationError(
            f"{what}: {schema.__name__} is a RootModel; an event's data is a JSON object"
        )
    return schema


def check_registry(schemas: Mapping[str, Any] | None) -> dict[str, type[BaseModel]]:
    """Checks ``Engine(event_schemas=...)``: event names to pydantic models."""
    checked: dict[str, type[BaseModel]] = {}
    for name, schema in (schemas or {}).items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"event_schemas: {name!r} is not an event name")
        checked[name] = check_schema(schema, f"event_schemas[{name!r}]")
    return checked


def mismatch(name: str, schema: type[BaseModel], error: ValidationError) -> str:
    """The message of a refusal or a failure: the event, the model, and pydantic's message."""
    return f"event {name!r} does not match its schema {schema.__name__}: {error}"


def check_sent(
    payloads: Iterable[dict[str, Any]], schemas: Mapping[str, list[type[BaseModel]]]
) -> None:
    """Checks events about to be sent (their JSON form) against the schemas of their names.

    Raises:
        InvalidEventError: the first mismatch, with pydantic's message (``__cause__`` is
            pydantic's ``ValidationError``).
    """
    for payload in payloads:
        for schema in schemas.get(payload["name"], ()):
            try:
                schema.model_validate(payload["data"])
            except ValidationError as exc:
                raise InvalidEventError(mismatch(payload["name"], schema, exc)) from exc


def typed(event: Event[Any], schema: type[BaseModel]) -> Event[Any]:
    """``event`` as an ``Event[schema]``, its data validated.

    Raises:
        pydantic.ValidationError: the data does not match.
    """
    data = schema.model_validate(event.data)
    # Built without validating again: the other fields come from a valid Event already.
    return Event[schema].model_construct(  # type: ignore[valid-type]
        _fields_set=event.model_fields_set | {"data"},
        name=event.name,
        data=data,
        id=event.id,
        ts=event.ts,
        v=event.v,
    )


def schema_of(function: Function, event_name: str) -> type[BaseModel] | None:
    """The schema ``function`` declares for events named ``event_name``, or None.

    An invoked run's data is typed by the function's schema when its triggers declare exactly
    one (the function is written for that one shape of data).
    """
    declared = {t.event: t.schema for t in function.event_triggers if t.schema is not None}
    if event_name == INVOKED and event_name not in declared:
        distinct = set(declared.values())
        return distinct.pop() if len(distinct) == 1 else None
    return declared.get(event_name)


def typed_events(function: Function, events: list[Event[Any]]) -> list[Event[Any]]:
    """The run's events as its function receives them: typed where it declares a schema.

    Raises:
        EventSchemaError: an event does not validate; the run fails with pydantic's message.
    """
    result = []
    for event in events:
        schema = schema_of(function, event.name)
        if schema is None:
            result.append(event)
            continue
        try:
            result.append(typed(event, schema))
        except ValidationError as exc:
            raise EventSchemaError(mismatch(event.name, schema, exc)) from None
    return result


def sent_schemas(registry: Mapping[str, type[BaseModel]]) -> dict[str, list[type[BaseModel]]]:
    """The schemas sent events are checked against, by event name: the app's registry. A
    function's trigger schema types what it receives, not what the app sends: two functions
    may take two versions of one event (told apart by ``v`` in their ``if_exp``)."""
    return {name: [schema] for name, schema in registry.items()}


def check_handler(fn_id: str, handler: Callable[..., Any], triggers: list[Trigger]) -> None:
    """Refuses a handler declared ``Context[Model]`` whose triggers type its events otherwise:
    mypy cannot tie the annotation to the trigger (a value), so registration does.

    Raises:
        ConfigurationError: the annotation's model is not the schema every event trigger
            declares.
    """
    annotated = _annotated_schema(handler)
    if annotated is None:
        return
    schemas = {t.schema for t in triggers if hasattr(t, "schema")}
    if schemas and schemas != {annotated}:
        declared = ", ".join(sorted(s.__name__ if s else "no schema" for s in schemas))
        raise ConfigurationError(
            f"function {fn_id!r} is declared Context[{annotated.__name__}] but its triggers"
            f" declare {declared}: ctx.event.data would not be a {annotated.__name__}"
        )


def _annotated_schema(handler: Callable[..., Any]) -> type[BaseModel] | None:
    """The model of a handler's ``Context[Model]`` annotation, if it can be resolved."""
    try:
        hints = typing.get_type_hints(handler)
    except Exception:  # names only the handler's module knows at run time: no check
        return None
    params = [h for name, h in hints.items() if name != "return"]
    if not params or typing.get_origin(params[0]) is not Context:
        return None
    [data] = typing.get_args(params[0])
    return data if isinstance(data, type) and issubclass(data, BaseModel) else None
