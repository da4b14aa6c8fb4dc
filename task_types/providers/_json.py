"""Typed access to a decoded JSON body that fails with a ParseError naming the path.

Adapters read provider JSON through `J` so that an unexpected shape becomes one clear
message ("nba: $.game.homeTeam.score: expected an integer, got 'abc'") instead of a
KeyError deep inside a handler or, worse, a silent zero.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from taskmgr.handlers import ParseError


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class J:
    """A value inside a provider's JSON body, with the path that leads to it."""

    provider: str
    value: Any
    path: str = "$"

    def fail(self, problem: str) -> ParseError:
        return ParseError(self.provider, self.path, problem)

    def _child_path(self, key: str | int) -> str:
        return f"{self.path}[{key}]" if isinstance(key, int) else f"{self.path}.{key}"

    def __getitem__(self, key: str | int) -> J:
        found = self.get(key)
        if found is None:
            raise J(self.provider, None, self._child_path(key)).fail("missing")
        return found

    def get(self, key: str | int) -> J | None:
        """The child, or None when it is absent or JSON null (optional fields)."""
        if isinstance(key, int):
            items = self.as_list_raw()
            value = items[key] if -len(items) <= key < len(items) else None
        else:
            value = self.as_dict_raw().get(key)
        return None if value is None else J(self.provider, value, self._child_path(key))

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def as_dict_raw(self) -> dict[str, Any]:
        if not isinstance(self.value, dict):
            raise self.fail(f"expected an object, got {_show(self.value)}")
        return self.value

    def as_list_raw(self) -> list[Any]:
        if not isinstance(self.value, list):
            raise self.fail(f"expected a list, got {_show(self.value)}")
        return self.value

    def items(self) -> Iterator[J]:
        for index, _ in enumerate(self.as_list_raw()):
            yield J(self.provider, self.value[index], self._child_path(index))

    def as_str(self) -> str:
        if not isinstance(self.value, str):
            raise self.fail(f"expected a string, got {_show(self.value)}")
        return self.value

    def as_bool(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.fail(f"expected true or false, got {_show(self.value)}")
        return self.value

    def as_int(self) -> int:
        # bool is an int subclass in Python; a true/false where a number belongs is a
        # shape change, not the number 1.
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            if isinstance(self.value, float) and self.value.is_integer():
                return int(self.value)
            raise self.fail(f"expected an integer, got {_show(self.value)}")
        if self.value < 0:
            raise self.fail(f"expected a non-negative integer, got {self.value}")
        return self.value

    def as_int_text(self) -> int:
        """An integer sent as a string (ESPN scores), or as a number."""
        if isinstance(self.value, str):
            text = self.value.strip()
            if not text.isdigit():
                raise self.fail(f"expected an integer string, got {_show(self.value)}")
            return int(text)
        return self.as_int()

    def as_id(self) -> str:
        """An identifier some providers send as a number and some as a string."""
        if isinstance(self.value, str) and self.value.strip():
            return self.value.strip()
        if isinstance(self.value, int) and not isinstance(self.value, bool):
            return str(self.value)
        raise self.fail(f"expected an id, got {_show(self.value)}")

    def as_utc(self) -> datetime:
        """A UTC timestamp: with or without seconds ("2026-05-02T23:30Z"), "Z" or an offset."""
        text = self.as_str().strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise self.fail(f"expected an ISO-8601 timestamp, got {_show(self.value)}") from None
        if moment.tzinfo is None:
            raise self.fail(f"expected a timestamp with a time zone, got {_show(self.value)}")
        return moment.astimezone(UTC)


_MMSS = re.compile(r"^(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")
_ISO_DURATION = re.compile(r"^PT(?:(\d+)M)?(\d+(?:\.\d+)?)S$")


def format_clock(minutes: int, seconds: float) -> str:
    whole = int(seconds)
    tenths = round((seconds - whole) * 10)
    if tenths >= 10:  # 59.96 rounds up into the next second
        whole, tenths = whole + 1, 0
    text = f"{minutes:02d}:{whole:02d}"
    return f"{text}.{tenths}" if tenths else text


def normalise_clock(raw: str) -> str | None:
    """'PT07M15.00S', '3:37 ' and '8:41' all become 'MM:SS' ('07:15', '03:37', '08:41');
    an empty clock is None; anything else is returned stripped, as the provider wrote it."""
    text = raw.strip()
    if not text:
        return None
    match = _ISO_DURATION.match(text) or _MMSS.match(text)
    if match is None:
        return text
    minutes = int(match.group(1) or 0)
    return format_clock(minutes, float(match.group(2)))


def clock_seconds(clock: str | None) -> float | None:
    """Seconds left on a normalised clock, None when unknown."""
    if clock is None:
        return None
    match = _MMSS.match(clock)
    if match is None:
        return None
    return int(match.group(1)) * 60 + float(match.group(2))
