"""Records: small classes of named fields, without :mod:`dataclasses`.

The values that ``uffdpy resume`` makes on its way to the connect (the
commands' table, the image formats, the device sections, ``ResumeOptions``,
``ResumeStats``, ``MapStats``) are :class:`Record` classes.  Importing
``dataclasses`` (it imports ``inspect``, and that ``ast``, ``dis`` and
``tokenize``) and making five classes with it cost 16 ms of the command's
72 ms from its spawn to the connect (medians of 20 interpreters on this
machine: 11 ms the import, 5 ms the classes, whose methods dataclasses writes
as source and compiles).  Elsewhere uffdpy uses dataclasses.

A record's fields are its annotated names, base classes first, in order; a
field with a class-level value has that default (a list or dict default is
copied for each record), a name starting with ``_`` or annotated
``ClassVar`` is not a field.  A record is made with the fields by position or
by name, then ``_check()`` runs (define it to validate; raise ValueError).
It has a ``repr``, equality with a record of the same class and the same
fields, :meth:`Record.replace` (and ``copy.replace`` on Python 3.13) and
:meth:`Record.as_dict`.  ``class X(Record, frozen=True)`` refuses
assignment after ``__init__`` (:class:`FrozenRecordError`) and is hashable;
a record not frozen is not hashable, as a mutable dataclass is not.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Dict, Tuple

if TYPE_CHECKING:
    from typing_extensions import Self, dataclass_transform
else:
    def dataclass_transform(**_: Any) -> Any:
        return lambda cls: cls

__all__ = ["Record", "FrozenRecordError"]

_NO_DEFAULT = object()


class FrozenRecordError(AttributeError):
    """An assignment to a field of a frozen record."""


@dataclass_transform()
class Record:
    """The base of a record class: see the module's documentation."""

    _fields: ClassVar[Tuple[str, ...]] = ()
    _defaults: ClassVar[Dict[str, Any]] = {}
    _frozen: ClassVar[bool] = False

    def __init_subclass__(cls, *, frozen: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = list(cls._fields)
        defaults = dict(cls._defaults)
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():
            if name.startswith("_") or str(annotation).startswith(("ClassVar", "typing.ClassVar")):
                continue
            if name not in fields:
                fields.append(name)
            value = cls.__dict__.get(name, _NO_DEFAULT)
            if value is not _NO_DEFAULT:
                defaults[name] = value
            elif defaults and name not in defaults:
                raise TypeError(f"{cls.__name__}: field {name!r} without a default follows "
                                "fields with one")
        cls._fields = tuple(fields)
        cls._defaults = defaults
        cls._frozen = frozen or cls._frozen
        if "__hash__" not in cls.__dict__:      # a class's own __hash__ is kept
            cls.__hash__ = Record._hash if cls._frozen else None  # type: ignore[assignment]
        if cls._frozen:                 # a record not frozen assigns at full speed
            cls.__setattr__ = _refuse_set  # type: ignore[assignment]
            cls.__delattr__ = _refuse_delete  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        if len(args) > len(cls._fields):
            raise TypeError(f"{cls.__name__}() takes {len(cls._fields)} fields, "
                            f"{len(args)} given")
        values = dict(zip(cls._fields, args))
        for name, value in kwargs.items():
            if name not in cls._fields:
                raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}")
            if name in values:
                raise TypeError(f"{cls.__name__}() got two values for {name!r}")
            values[name] = value
        for name in cls._fields:
            if name in values:
                value = values[name]
            elif name in cls._defaults:
                value = cls._defaults[name]
                if isinstance(value, (list, dict)):
                    value = type(value)(value)
            else:
                raise TypeError(f"{cls.__name__}() missing the field {name!r}")
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        """Validate the fields just set (raise ValueError); nothing by default."""

    def _values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def _hash(self) -> int:
        return hash((type(self), self._values()))

    def replace(self, **changes: Any) -> Self:
        """A new record of the same class: these fields changed, checked again."""
        values = {name: getattr(self, name) for name in self._fields}
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        values.update(changes)
        return type(self)(**values)

    __replace__ = replace

    def as_dict(self) -> Dict[str, Any]:
        """The fields by name; lists, dicts and records in them copied."""
        return {name: _copied(getattr(self, name)) for name in self._fields}


def _refuse_set(self: Record, name: str, value: Any) -> None:
    raise FrozenRecordError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")


def _refuse_delete(self: Record, name: str) -> None:
    raise FrozenRecordError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")


def _copied(value: Any) -> Any:
    if isinstance(value, Record):
        return value.as_dict()
    if isinstance(value, list):
        return [_copied(v) for v in value]
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value
