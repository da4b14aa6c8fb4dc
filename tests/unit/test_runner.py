"""The runner's pure parts: per-host limits, Retry-After, the hosts a task may call and
the redaction of credentials."""

from __future__ import annotations

import httpx
import pytest

from runners.limits import HostLimit, parse_host_limits
from runners.poller import _retry_after
from taskmgr.errors import InvalidInput
from taskmgr.redact import redact_text, redact_url


def test_parse_host_limits() -> None:
    assert parse_host_limits("") == {}
    assert parse_host_limits("a.com=8:2.5, 127.0.0.1:8765=4") == {
        "a.com": HostLimit(8, 2.5),
        "127.0.0.1:8765": HostLimit(4, 0.0),
    }
    for bad in ("a.com", "a.com=0", "a.com=x:1", "=3"):
        with pytest.raises(InvalidInput):
            parse_host_limits(bad)


def test_retry_after_parsing() -> None:
    def resp(value: str) -> httpx.Headers:
        return httpx.Response(429, headers={"Retry-After": value}).headers

    assert _retry_after(resp("3")) == 3.0
    assert _retry_after(resp("0.5")) == 0.5
    assert _retry_after(resp("Tue, 24 Nov 2020 18:00:00 GMT")) == 0.0
    assert _retry_after(resp("soon")) is None
    assert _retry_after(httpx.Response(429).headers) is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:hunter2@api.example.com/x", "https://user:***@api.example.com/x"),
        ("https://api.example.com/x?apiKey=s3cret&day=1", "https://api.example.com/x?apiKey=***&day=1"),
        (
            "https://api.example.com/x?api_key=a&token=b&sig=c",
            "https://api.example.com/x?api_key=***&token=***&sig=***",
        ),
        ("https://api.example.com/x?day=1", "https://api.example.com/x?day=1"),
    ],
)
def test_credentials_are_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact_text(f"ConnectError: cannot reach {url} now") == f"ConnectError: cannot reach {shown} now"


def test_allowed_hosts_take_patterns_and_ports() -> None:
    from runners.runner import allowed_hosts

    pairs = allowed_hosts(["https://cdn.nba.com", "http://127.0.0.1:8765"], "*.espn.com, stats.test:8443")
    assert ("cdn.nba.com", None) in pairs and ("127.0.0.1", 8765) in pairs
    assert ("*.espn.com", None) in pairs and ("stats.test", 8443) in pairs
