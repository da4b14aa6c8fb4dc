"""Adapters for the real sports APIs, all producing the common model in `model`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from task_types.providers.espn import EspnProvider
from task_types.providers.mlb import MlbProvider
from task_types.providers.model import Game, GameStatus, PeriodScore
from task_types.providers.nba import NbaProvider
from task_types.providers.nhl import NhlProvider
from task_types.providers.protocol import Provider

# Read-only: the adapters are stateless, and nobody should register into a shared dict.
PROVIDERS: Mapping[str, Provider] = MappingProxyType(
    {p.name: p for p in (NbaProvider(), EspnProvider(), MlbProvider(), NhlProvider())}
)


class UnknownProvider(LookupError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        super().__init__(f"no provider named {name!r}; known providers: {', '.join(sorted(known))}")


def get_provider(name: str) -> Provider:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise UnknownProvider(name, PROVIDERS) from None


__all__ = [
    "PROVIDERS",
    "Game",
    "GameStatus",
    "PeriodScore",
    "Provider",
    "UnknownProvider",
    "get_provider",
]
