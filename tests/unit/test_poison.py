"""Poison progress messages are bad messages: each breaks a bound of the contracts, and
decoding refuses it (the manager then dead-letters it: tests/integration/test_poison.py)."""

from __future__ import annotations

import json

import pytest

from taskmgr.messages import BadMessage, decode_progress
from tests.helpers import POISON


@pytest.mark.parametrize("kind", list(POISON))
def test_poison_is_a_bad_message(kind: str) -> None:
    with pytest.raises(BadMessage):
        decode_progress(json.dumps(POISON[kind]).encode())
