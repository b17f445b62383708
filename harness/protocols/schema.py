"""Typed protocol schemas: every protocol file is checked at load time, not by a ``KeyError`` mid-run.

A task's settings are described by frozen dataclasses whose type hints say what each key holds
(``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``Optional[...]``, ``List[...]``,
``Tuple[...]``, ``Dict[str | int, ...]``, nested dataclasses, or a ``Union`` of dataclasses told apart by a
``Literal`` field such as ``mode``). :func:`check_value` walks a YAML value against such a type and
raises one :class:`~harness.errors.ConfigError` naming the file, the key and what was expected: an
unknown key names the nearest valid one (difflib), a missing key the keys that are required, a wrong
type the type or the allowed values. Checked values come back as plain dicts and lists (records and
evaluators read settings as dicts), with ints given for floats turned into floats.

Adding a task's schema (one module per task in this package, named after the task)::

    # harness/protocols/schema_mytask.py
    from dataclasses import dataclass
    from typing import Literal

    from .schema import Precision, TaskSchema, register_schema


    @dataclass(frozen=True)
    class MyTaskSettings:
        mode: Literal["a", "b"]
        threshold: float           # say in the protocol file where the value comes from
        precision: Precision = "fp32"


    @register_schema("mytask")
    class MyTaskSchema(TaskSchema):
        settings = MyTaskSettings  # or Union[SettingsA, SettingsB], chosen by a shared Literal field

        @classmethod
        def check_settings(cls, settings, where):  # optional: checks across keys
            ...

Modules named ``schema_*.py`` here are imported on first use, so the decorated class is all it takes. A
protocol file of a task without a registered schema is an error that says which module to add.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import pkgutil
import typing
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, Union

from ..errors import ConfigError

#: numeric precision of the backbone forward: fp32 is the reference; bf16 runs it under
#: ``torch.autocast(dtype=torch.bfloat16)`` (on CPU too) and the record says so
Precision = Literal["fp32", "bf16"]
PRECISIONS: Tuple[str, ...] = typing.get_args(Precision)

_SCHEMAS: Dict[str, Type["TaskSchema"]] = {}
_DISCOVERED = False


class TaskSchema:
    """The schema of one task's protocols: a settings type plus optional checks across keys."""

    task: str = ""
    #: a dataclass, or a Union of dataclasses that share a Literal field (the discriminator)
    settings: Any = None

    @classmethod
    def check_settings(cls, settings: Dict[str, Any], where: str) -> None:
        """Checks that involve several keys; raise :class:`ConfigError` with ``where`` in the message."""


def register_schema(task: str):  # type: ignore[no-untyped-def]
    """Class decorator: ``schema`` checks the protocols of ``task``. Duplicates are an error."""

    def deco(cls: Type[TaskSchema]) -> Type[TaskSchema]:
        if task in _SCHEMAS and _SCHEMAS[task] is not cls:
            raise ConfigError(f"duplicate protocol schema for task {task!r}: {_SCHEMAS[task].__module__} and "
                              f"{cls.__module__}")
        cls.task = task
        _SCHEMAS[task] = cls
        return cls

    return deco


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    here = os.path.dirname(os.path.abspath(__file__))
    for info in pkgutil.iter_modules([here]):
        if info.name.startswith("schema_"):
            importlib.import_module(f"{__package__}.{info.name}")


def schema_for(task: str, path: str) -> Type[TaskSchema]:
    """The registered schema of ``task``; an unknown task names the file and the known tasks."""
    _discover()
    if task not in _SCHEMAS:
        near = difflib.get_close_matches(task, list(_SCHEMAS), n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"protocol file {path}: task {task!r} has no protocol schema{hint}; known tasks: "
                          f"{', '.join(sorted(_SCHEMAS))}. A new task adds harness/protocols/schema_<task>.py "
                          f"(see harness/protocols/schema.py)")
    return _SCHEMAS[task]


def schema_tasks() -> List[str]:
    _discover()
    return sorted(_SCHEMAS)


# -- the checker ------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if origin in (dict, Dict):
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    return getattr(tp, "__name__", str(tp))


class SchemaError(ConfigError):
    """A protocol value that does not fit its schema: the file, the key (dotted path) and what was expected."""

    def __init__(self, path: str, key: str, msg: str) -> None:
        super().__init__(f"protocol file {path}: {key}: {msg}")
        self.path, self.key, self.msg = path, key, msg


def _fail(path: str, key: str, msg: str) -> SchemaError:
    return SchemaError(path, key, msg)


def fields_of(tp: Any) -> List[str]:
    """Every key a dataclass, or any member of a Union of dataclasses, accepts (in declaration order)."""
    members = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    out: List[str] = []
    for m in members:
        if dataclasses.is_dataclass(m):
            out += [f.name for f in dataclasses.fields(m) if f.name not in out]
    return out


def unknown_key_error(path: str, where: str, key: str, allowed: Sequence[str]) -> SchemaError:
    near = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return _fail(path, f"{where}.{key}" if where else str(key),
                 f"unknown key {key!r}{hint} (valid keys: {', '.join(allowed)})")


def _discriminator(members: Sequence[Any]) -> Optional[str]:
    """The first field that is a Literal in every dataclass of a Union (e.g. ``mode``, ``policy``)."""
    if not members or not all(dataclasses.is_dataclass(m) for m in members):
        return None
    hints = [typing.get_type_hints(m) for m in members]
    for f in dataclasses.fields(members[0]):
        if all(typing.get_origin(h.get(f.name)) is Literal for h in hints):
            return f.name
    return None


def _check_dataclass(value: Any, tp: Any, path: str, where: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, where, f"expected {_type_name(tp)}, got {value!r}")
    fields = dataclasses.fields(tp)
    names = [f.name for f in fields]
    for k in value:
        if k not in names:
            raise unknown_key_error(path, where, k, names)
    hints = typing.get_type_hints(tp)
    out: Dict[str, Any] = {}
    missing = []
    for f in fields:
        key = f"{where}.{f.name}" if where else f.name
        if f.name in value:
            out[f.name] = check_value(value[f.name], hints[f.name], path, key)
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            missing.append(f.name)
    if missing:
        required = [f.name for f in fields if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
        raise _fail(path, where or "(top level)", f"missing key(s) {', '.join(missing)} "
                                                  f"(required: {', '.join(required)})")
    return out


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_value(value: Any, tp: Any, path: str, where: str) -> Any:
    """``value`` checked against the type ``tp``; returns it as plain data (dicts, lists, numbers, strings)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _check_dataclass(value, tp, path, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise _fail(path, where, f"{value!r} is not allowed; expected one of {', '.join(map(repr, allowed))}")
        return value
    if origin is Union:
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(members) < len(typing.get_args(tp)):
                return None
            raise _fail(path, where, f"must not be empty; expected {_type_name(tp)}")
        disc = _discriminator(members)
        if disc is not None and isinstance(value, dict):
            allowed = [a for m in members for a in typing.get_args(typing.get_type_hints(m)[disc])]
            if disc not in value:
                raise _fail(path, where or "(top level)", f"missing key(s) {disc} (one of "
                                                          f"{', '.join(map(repr, allowed))}, says which keys apply)")
            for m in members:
                if value[disc] in typing.get_args(typing.get_type_hints(m)[disc]):
                    return _check_dataclass(value, m, path, where)
            raise _fail(path, f"{where}.{disc}" if where else disc,
                        f"{value[disc]!r} is not allowed; expected one of {', '.join(map(repr, allowed))}")
        if len(members) == 1:
            try:
                return check_value(value, members[0], path, where)
            except SchemaError as e:
                if e.key != where or len(members) == len(typing.get_args(tp)):
                    raise
                raise _fail(path, where, f"{e.msg} (or null)") from None
        for m in members:
            try:
                return check_value(value, m, path, where)
            except ConfigError:
                continue
        raise _fail(path, where, f"expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, where, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, where, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and _numeric(value) else ""
            raise _fail(path, where, f"expected a number, got {value!r}{hint}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(path, where, f"expected a string, got {value!r}")
        return value
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(path, where, f"expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if origin in (list, List) or (len(args) == 2 and args[1] is Ellipsis):
            return [check_value(v, args[0], path, f"{where}[{i}]") for i, v in enumerate(value)]
        if len(value) != len(args):
            raise _fail(path, where, f"expected {_type_name(tp)}, got {len(value)} value(s) {list(value)!r}")
        return [check_value(v, a, path, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise _fail(path, where, f"expected {_type_name(tp)}, got {value!r}")
        kt, vt = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if kt is int and (not isinstance(k, int) or isinstance(k, bool)):
                raise _fail(path, where, f"key {k!r} must be an integer")
            if kt is not int and not isinstance(k, str):
                raise _fail(path, where, f"key {k!r} must be a string")
            out[k] = check_value(v, vt, path, f"{where}.{k}")
        return out
    raise TypeError(f"protocol schema type {tp!r} at {where} is not supported by harness.protocols.schema")


# -- the file-level schema ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProtocolFile:
    """The keys of every protocol file, whatever the task."""

    id: str
    version: int
    task: str
    description: str
    source: str
    defaults: Dict[str, Any]
    datasets: Dict[str, Optional[Dict[str, Any]]]
    default: bool = False  # the task's default protocol (exactly one per task)
    compare_with: List[str] = dataclasses.field(default_factory=list)  # published sources shown beside it


def check_protocol(data: Any, path: str) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
    """Check a loaded protocol file; returns (its top-level keys, the checked settings per dataset).

    ``defaults`` and every ``datasets.<name>`` entry may only hold keys of the task's settings; each
    dataset's settings (defaults overlaid with its entry) must then be complete and well typed.
    """
    top = check_value(data, ProtocolFile, path, "")
    if top["version"] < 1:
        raise _fail(path, "version", f"must be >= 1, got {top['version']}")
    schema = schema_for(top["task"], path)
    allowed = fields_of(schema.settings)
    for k in top["defaults"]:
        if k not in allowed:
            raise unknown_key_error(path, "defaults", k, allowed)
    if not top["datasets"]:
        raise _fail(path, "datasets", "must name at least one dataset")
    resolved: Dict[str, Dict[str, Any]] = {}
    for name, entry in top["datasets"].items():
        entry = entry or {}
        for k in entry:
            if k not in allowed:
                raise unknown_key_error(path, f"datasets.{name}", k, allowed)
        merged = {**top["defaults"], **entry}
        try:
            settings = check_value(merged, schema.settings, path, "")
        except SchemaError as e:  # name the part of the file the bad value came from
            first = e.key.split(".")[0].split("[")[0]
            if first == "(top level)":
                raise _fail(path, f"datasets.{name}", f"{e.msg}: give them in defaults or in datasets.{name}") from None
            if first in entry:
                raise _fail(path, f"datasets.{name}.{e.key}", e.msg) from None
            raise _fail(path, f"defaults.{e.key}", f"{e.msg} (resolving dataset {name})") from None
        schema.check_settings(settings, f"protocol file {path}: datasets.{name}")
        resolved[name] = settings
    return top, resolved
