"""Handlers by name: the built-in ones plus those third parties register through the
`taskmgr.handlers` entry-point group (`name = "package.module:HandlerClass"`).

A Registry is an ordinary object built once by each process and passed down; there is
no global mutable registry for tests to reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points

from task_types.base import Handler

ENTRY_POINT_GROUP = "taskmgr.handlers"


class UnknownHandler(LookupError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        super().__init__(
            f"no handler named {name!r}; known handlers: {', '.join(sorted(known)) or 'none'}"
            f" (third-party handlers register in the {ENTRY_POINT_GROUP!r} entry-point group)"
        )


def builtin_handlers() -> list[Handler]:
    from task_types import builtins

    return builtins.handlers()


class Registry:
    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self._handlers = dict(handlers)

    @classmethod
    def default(cls, *, with_entry_points: bool = True) -> Registry:
        handlers: dict[str, Handler] = {h.name: h for h in builtin_handlers()}
        if with_entry_points:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                handler = ep.load()()
                handlers[handler.name or ep.name] = handler
        return cls(handlers)

    def get(self, name: str) -> Handler:
        try:
            return self._handlers[name]
        except KeyError:
            raise UnknownHandler(name, self._handlers) from None

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def names(self) -> list[str]:
        return sorted(self._handlers)
