"""Decoding cost of one process event: corecapd's parser against pyroute2's, same run.

The reason corecapd/proc_events.py decodes cn_proc datagrams itself: the exec path pays
this for every exec on the host, matching or not.

    .venv/bin/python bench/event_decode.py [--events 20000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from pyroute2.netlink.connector.cn_proc import ProcEventMarshal

from corecapd.proc_events import PROC_EVENT_EXEC, PROC_EVENT_EXIT, encode_event, parse_messages


def per_event(decode: Callable[[bytes], object], datagrams: list[bytes], repeats: int) -> float:
    """Median over repeats of CPU seconds per decoded datagram."""
    results = []
    for _ in range(repeats):
        start = time.process_time()
        for datagram in datagrams:
            decode(datagram)
        results.append((time.process_time() - start) / len(datagrams))
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    datagrams = [
        encode_event(PROC_EVENT_EXEC if n % 2 else PROC_EVENT_EXIT, 0, n, n, 1000 + n, 1000 + n)
        for n in range(args.events)
    ]
    marshal = ProcEventMarshal()
    ours = per_event(lambda d: parse_messages(d), datagrams, args.repeats)
    theirs = per_event(lambda d: list(marshal.parse(d)), datagrams, args.repeats)
    print(f"decode one cn_proc event, median of {args.repeats} x {args.events}, CPU time")
    print(f"corecapd parse_messages   {ours * 1e6:7.2f} us")
    print(f"pyroute2 ProcEventMarshal {theirs * 1e6:7.2f} us")
    print(f"ratio corecapd / pyroute2 {ours / theirs:7.3f}")


if __name__ == "__main__":
    main()
