"""A minimal Alertmanager webhook receiver: the example endpoint of compose's Alertmanager
(docs/observability/alertmanager.yml). It prints one line per alert of each notification
(firing or resolved, name, severity, the labels that tell which, the summary) and
answers 200; a body that is not an Alertmanager notification gets 400 with the reason
and prints nothing. Standard library only, so it runs in a bare python image:

    python examples/alert_receiver.py --port 9095

Replace it with a pager, a chat hook or a ticket system: Alertmanager POSTs the same JSON
(version 4) to any `webhook_configs` URL."""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

MAX_BODY_BYTES = 1 << 20
# Labels every alert has; the others say which pool, host or queue it is about.
COMMON = {"alertname", "severity", "job", "instance"}


class BadNotification(ValueError):
    pass


def lines_of(body: bytes) -> list[str]:
    """One line per alert of an Alertmanager notification; BadNotification if `body` is
    not one."""
    try:
        payload: Any = json.loads(body)
    except ValueError as exc:
        raise BadNotification(f"not JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        raise BadNotification("not an Alertmanager notification: no list of alerts")
    out = []
    for alert in payload["alerts"]:
        if not isinstance(alert, dict) or not isinstance(alert.get("labels"), dict):
            raise BadNotification("an alert without labels")
        labels: dict[str, Any] = alert["labels"]
        which = " ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in COMMON)
        summary = (alert.get("annotations") or {}).get("summary", "")
        status = str(alert.get("status", payload.get("status", "?"))).upper()
        name = labels.get("alertname", "?")
        severity = labels.get("severity", "?")
        out.append(f"{status} {name} [{severity}] {which} {summary}".replace("  ", " ").strip())
    return out


def handler_for(out: TextIO) -> type[BaseHTTPRequestHandler]:
    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._answer(413, f"body over {MAX_BODY_BYTES} bytes")
                return
            try:
                lines = lines_of(self.rfile.read(length))
            except BadNotification as exc:
                self._answer(400, str(exc))
                return
            for line in lines:
                print(line, file=out, flush=True)
            self._answer(200, "ok")

        def _answer(self, status: int, text: str) -> None:
            data = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # the alerts are the log
            pass

    return Receiver


def make_server(host: str, port: int, out: TextIO = sys.stdout) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), handler_for(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9095)
    args = parser.parse_args(argv)
    server = make_server(args.host, args.port)
    print(f"alert receiver listening on {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
