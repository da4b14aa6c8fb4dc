"""Credentials kept out of history, logs, events and error messages: a provider URL may
carry a user and password, or an API key in its query."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Query parameters whose values are secrets (compared lower-case, without - and _).
SECRET_PARAMS = frozenset(
    {"apikey", "key", "token", "accesstoken", "secret", "password", "pass", "sig", "signature", "auth"}
)
MASK = "***"
_URL = re.compile(r"""[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'"<>]+""")


def redact_url(url: str) -> str:
    """The URL with its password, and the values of secret-looking query parameters,
    replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{MASK}@{hostport}" if ":" in userinfo else f"{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [
                (k, MASK if k.lower().replace("_", "").replace("-", "") in SECRET_PARAMS else v)
                for k, v in pairs
            ],
            safe="*",
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL in a message (an error, a log line) redacted."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)
