"""`stream-supervisor simulate`: the simulated broker alone, with every chaos knob a flag.

For local development and for chaos tests of a deployed supervisor: point
`APCA_API_BASE_URL` / `APCA_API_STREAM_URL` at the printed URLs and the simulated keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .chaos import ChaosConfig
from .market import SimConfig
from .ratelimit import DEFAULT_RATE_LIMIT
from .server import SimServer, serve
from .simulated import SimulatedBroker
from .userbot import run_user_bot

#: Help for each chaos knob; `simulate --help` lists them all.
KNOB_HELP: dict[str, str] = {
    "duplicate_prob": "probability that an update frame is sent again as a burst",
    "duplicate_burst": "copies in a duplicate burst, counting the original",
    "disconnect_every": "close the socket after every N update frames (0 = never)",
    "disconnect_prob": "probability of closing the socket after an update frame",
    "disconnect_at": "close right after these global update-frame indices (comma list)",
    "abrupt_prob": "fraction of disconnects done as a TCP reset instead of a clean close",
    "reorder_window": "shuffle updates within windows of this many frames",
    "delay_prob": "probability of sleeping before a frame",
    "delay_max": "longest such sleep, seconds",
    "stall_prob": "probability of going half-open (no reads, no pongs) before a frame",
    "stall_seconds": "how long a stall lasts before the connection is reset",
    "malformed_prob": "probability of injecting invalid, truncated or wrongly typed frames",
    "unknown_event_prob": "probability of injecting an update with an unknown event type",
    "oversized_prob": "probability of injecting an oversized frame",
    "oversized_bytes": "size of an oversized frame",
    "text_frame_prob": "fraction of frames sent as text instead of binary",
    "skip_partial_prob": "fraction of partial_fill updates never streamed (REST has them)",
    "replay_on_connect": "after listen, replay up to this many recent updates again",
    "replay_before_listening": "send that replay before the listening reply, not after it",
    "reject_429_for": "seconds after start during which every upgrade gets HTTP 429",
    "reject_429_connects": "the first N upgrade attempts get HTTP 429",
    "outage_after_disconnect": "after a chaos disconnect, answer every upgrade with HTTP 429 "
                               "for this many seconds (a stale session the broker still holds)",
    "rest_error_prob": "probability that a REST call answers 500",
    "rest_429_prob": "probability that a REST call answers 429 with Retry-After",
    "rest_retry_after": "Retry-After seconds on those 429s",
    "rest_short_pages": "return fewer than page_size activities per page",
    "rest_delay_max": "slow REST answers by up to this many seconds",
    "poison_prob": "probability of injecting an update of an unknown order holding a value "
                   "the decoder's bounds or the store refuse",
}


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--ws-port", type=int, default=0, help="stream port (default: any free)")
    p.add_argument("--rest-port", type=int, default=0, help="REST port (default: any free)")
    p.add_argument("--seed", type=int, default=1, help="order-flow and chaos seed")
    p.add_argument("--orders", type=int, default=200, help="orders to trade, then finish")
    p.add_argument("--rate", type=float, default=200.0, help="updates per second")
    p.add_argument("--rest-rate-limit", type=int, default=DEFAULT_RATE_LIMIT,
                   help="REST requests per 60 s window for the account, as Alpaca limits "
                        f"them (0: no limit; default {DEFAULT_RATE_LIMIT})")
    p.add_argument("--user-bot-rate", type=float, default=0.0,
                   help="REST requests per minute the account's own trading bot spends "
                        "(default 0: no bot)")
    p.add_argument("--account-id", default=None, help="account id (default: from the seed)")
    p.add_argument("--key-id", default="SIMKEY", help="key the broker accepts")
    p.add_argument("--secret-key", default="SIMSECRET", help="secret the broker accepts")
    p.add_argument("--ground-truth", type=Path, default=None,
                   help="write the ground truth JSON here when the market finishes")
    p.add_argument("--linger", type=float, default=None,
                   help="keep serving this many seconds after the market finished "
                        "(default: until interrupted)")
    history = p.add_argument_group("an account with history (docs/design.md, section 9)")
    history.add_argument("--hold", action="append", default=[], metavar="SYMBOL:QTY:AVG",
                         help="a position held before the session (QTY negative: short); "
                              "repeat for several")
    history.add_argument("--replace-prob", type=float, default=0.0,
                         help="chance that an order filling in pieces is replaced part way "
                              "(default 0)")
    history.add_argument("--activities-retention", type=float, default=None,
                         help="seconds of market time FILL activities are kept "
                              "(default: all)")
    chaos = p.add_argument_group("chaos knobs (all off by default, all seeded)")
    for f in fields(ChaosConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            chaos.add_argument(flag, action="store_true", help=KNOB_HELP.get(f.name, ""))
        elif isinstance(default, tuple):
            chaos.add_argument(flag, default="", metavar="N,N,...",
                               help=KNOB_HELP.get(f.name, ""))
        else:
            chaos.add_argument(flag, type=type(default), default=default,
                               help=f"{KNOB_HELP.get(f.name, '')} (default {default})")


def chaos_from_args(args: argparse.Namespace) -> ChaosConfig:
    values: dict[str, Any] = {}
    for f in fields(ChaosConfig):
        value = getattr(args, f.name)
        if isinstance(f.default, tuple):
            value = tuple(int(x) for x in value.split(",") if x.strip())
        values[f.name] = value
    return ChaosConfig(**values)


def held_from_args(args: argparse.Namespace) -> tuple[tuple[str, str, str], ...]:
    out = []
    for spec in args.hold:
        parts = spec.split(":")
        if len(parts) != 3:
            raise SystemExit(f"--hold {spec!r}: expected SYMBOL:QTY:AVG, e.g. AAPL:-40:190.5")
        out.append((parts[0], parts[1], parts[2]))
    return tuple(out)


async def _serve(args: argparse.Namespace) -> None:
    broker = SimulatedBroker(SimConfig(
        seed=args.seed, account_id=args.account_id, key_id=args.key_id,
        secret_key=args.secret_key, orders=args.orders, rate=args.rate,
        chaos=chaos_from_args(args), rest_rate_limit=args.rest_rate_limit,
        preexisting=held_from_args(args), replace_prob=args.replace_prob,
        activities_retention=args.activities_retention,
    ))
    async with trio.open_nursery() as nursery:
        server: SimServer = await nursery.start(partial(
            serve, broker, host=args.host, ws_port=args.ws_port, rest_port=args.rest_port))
        await nursery.start(run_user_bot, broker, args.user_bot_rate)
        print(json.dumps({
            "stream_url": server.ws_url, "base_url": server.rest_url,
            "account_id": broker.account()["id"], "key_id": args.key_id,
        }), flush=True)
        await broker.run_market()
        if args.ground_truth is not None:
            args.ground_truth.write_text(json.dumps(broker.ground_truth(), indent=1))
        limiter = broker.rate_limiter
        print(json.dumps({"market": "finished", "fills": broker.ground_truth()["fills_total"],
                          "rest": {"requests": limiter.requests, "by_caller": limiter.by_caller,
                                   "refused": limiter.refused,
                                   "peak_in_window": limiter.peak_in_window}}),
              flush=True)
        if args.linger is not None:
            await trio.sleep(args.linger)
            nursery.cancel_scope.cancel()


def run_simulate(args: argparse.Namespace) -> int:
    try:
        trio.run(_serve, args)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="stream-supervisor simulate")
    add_simulate_arguments(parser)
    sys.exit(run_simulate(parser.parse_args()))
