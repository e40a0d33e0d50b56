"""`vfiouser-srv ctl --control PATH COMMAND [KEY=VALUE ...]`: ask a running server.

Sends one request on the control socket (docs/operations.md) and prints the reply as indented
JSON; an `error` reply goes to stderr with exit status 1. VALUE is parsed as JSON when it
can be (`deadline=5`, `options={"size":"1M"}`), else taken as a string. `subscribe` keeps
printing events, one JSON object per line, until interrupted.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def request(args: argparse.Namespace) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    for item in args.arguments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"vfiouser-srv ctl: {item!r}: arguments are KEY=VALUE")
        arguments[key] = parse_value(value)
    return {"execute": args.name, "arguments": arguments, "id": 1}


def run(args: argparse.Namespace) -> int:
    req = request(args)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(args.control)
        except OSError as exc:
            print(f"vfiouser-srv ctl: {args.control}: {exc}", file=sys.stderr)
            return 2
        lines = sock.makefile("rb")
        lines.readline()  # the greeting
        sock.sendall(json.dumps(req).encode() + b"\n")
        for line in lines:
            msg = json.loads(line)
            if "event" in msg and "id" not in msg:
                if args.name == "subscribe":
                    print(json.dumps(msg), flush=True)
                continue
            if "error" in msg:
                err = msg["error"]
                print(f"error: {err.get('class')}: {err.get('desc')}", file=sys.stderr)
                return 1
            if args.name != "subscribe":
                print(json.dumps(msg.get("return"), indent=2))
                return 0
        return 0 if args.name == "subscribe" else 1


def add_parser(sub: Any) -> None:
    c = sub.add_parser("ctl", help="send a command to a running server's control socket")
    c.add_argument("--control", required=True, metavar="PATH", help="the control socket")
    c.add_argument("name", metavar="COMMAND", help="e.g. query-devices (query-commands lists all)")
    c.add_argument("arguments", nargs="*", metavar="KEY=VALUE")


__all__ = ["add_parser", "parse_value", "request", "run"]
