"""The command line of traces: `serve --trace FILE [--trace-dma]`, `vfiouser-srv trace show`
and `vfiouser-srv trace replay` (docs/trace.md)."""

from __future__ import annotations

import argparse
import atexit
import sys
from typing import Any

import trio

from .config import ConfigError, DeviceConfig, parse_sets
from .objects import Device
from .trace import (
    CONNECT,
    DISCONNECT,
    IN,
    OUT,
    Trace,
    TraceError,
    Tracer,
    describe_record,
    read_trace,
)


def open_tracer(
    path: str, *, dma: bool, device: str, model: str, options: dict[str, str]
) -> Tracer:
    """A tracer writing to `path`, flushed and closed when the process exits."""
    try:
        tracer = Tracer(path, dma=dma, meta={"device": device, "model": model, "options": options})
    except OSError as exc:
        raise ConfigError(f"device {device}: cannot write trace {path}: {exc.strerror}") from None
    atexit.register(tracer.close)
    return tracer


def attach(dev: Device, config: DeviceConfig) -> None:
    """`--trace FILE` / `trace = "FILE"`: give the device its tracer."""
    if config.trace:
        dev.tracer = open_tracer(
            config.trace,
            dma=config.trace_dma,
            device=config.name,
            model=config.model,
            options=config.options,
        )


def add_serve_options(s: argparse.ArgumentParser) -> None:
    t = s.add_argument_group("trace", "record every message (docs/trace.md)")
    t.add_argument("--trace", metavar="FILE", help="write every message, both ways, to FILE")
    t.add_argument(
        "--trace-dma",
        action="store_true",
        help="keep DMA_READ/DMA_WRITE payloads in the trace (their size is always kept)",
    )


def add_parser(sub: Any) -> None:
    p = sub.add_parser("trace", help="show or replay a message trace (docs/trace.md)")
    tsub = p.add_subparsers(dest="trace_command", required=True)
    show = tsub.add_parser("show", help="print a trace, one line per message")
    show.add_argument("file")
    show.add_argument(
        "--command",
        dest="commands",
        action="append",
        default=[],
        help="only this command (repeatable)",
    )
    show.add_argument("--device", help="only this device's trace")
    show.add_argument("--connection", type=int, help="only this connection id")
    rep = tsub.add_parser("replay", help="replay the client side against a fresh model")
    rep.add_argument("file")
    rep.add_argument("--model", help="model to replay against (default: the recorded one)")
    rep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model option")
    rep.add_argument("--record", metavar="FILE", help="also write a trace of the replay")
    rep.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")


def run(args: argparse.Namespace) -> int:
    try:
        trace = read_trace(args.file)
    except TraceError as exc:
        print(f"vfiouser-srv: {exc}", file=sys.stderr)
        return 2
    if args.trace_command == "show":
        return show(trace, args)
    return replay_command(trace, args)


def show(trace: Trace, args: argparse.Namespace) -> int:
    if args.device is not None and trace.meta.get("device") != args.device:
        return 0
    wanted = {c.upper() for c in args.commands}
    print(
        f"# {trace.path}: trace v{trace.version}, device {trace.meta.get('device')} "
        f"({trace.meta.get('model')}), DMA payloads {'kept' if trace.dma else 'left out'}, "
        f"{len(trace.records)} records"
    )
    for r in trace.records:
        if args.connection is not None and r.conn != args.connection:
            continue
        if wanted:
            head = r.header()
            if head is None:
                continue
            from .trace import command_name

            if command_name(head[1]) not in wanted and str(head[1]) not in wanted:
                continue
        print(describe_record(r))
    return 0


def replay_command(trace: Trace, args: argparse.Namespace) -> int:
    import devices
    from devices import OptionError

    from .replay import replay

    spec = args.model or trace.meta.get("model")
    if not spec:
        print("vfiouser-srv: the trace names no model: give --model", file=sys.stderr)
        return 2
    options = dict(trace.meta.get("options", {})) if not args.model else {}
    for key in ("backing", "path"):  # never write into the recorded device's disk image
        if options.pop(key, None) is not None:
            print(f"replay: recorded option {key}= left out (give --set {key}=... to use one)")
    try:
        options.update(parse_sets(args.set))
        model = devices.create(str(spec), options)
    except (OptionError, ConfigError, ValueError) as exc:
        print(f"vfiouser-srv: {exc}", file=sys.stderr)
        return 2
    result = trio.run(lambda: replay(trace, model, record=args.record, timeout=args.timeout))
    n_in = sum(r.kind == IN for r in trace.records)
    n_out = sum(r.kind == OUT for r in trace.records)
    if result.divergence is not None:
        print(result.divergence.report())
        return 1
    conns = sum(r.kind == CONNECT for r in trace.records)
    ends = sum(r.kind == DISCONNECT for r in trace.records)
    print(
        f"identical: {result.messages_compared} server messages matched over "
        f"{result.connections} connection(s) ({n_in} client / {n_out} server messages "
        f"recorded, {conns} connect(s), {ends} disconnect(s))"
    )
    return 0


__all__ = ["add_parser", "add_serve_options", "attach", "open_tracer", "run"]
