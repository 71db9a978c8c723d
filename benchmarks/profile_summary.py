"""Summarise a py-spy raw (collapsed stacks) profile: where the samples are, by function.

    python -m benchmarks.profile_summary PROFILE.txt [--top 40] [--thread-filter TEXT]

Prints self samples (the frame on top of the stack) and inclusive samples (the frame
anywhere in the stack) per function, as a share of all samples, so a profile of the
pipeline child reads without a flame-graph viewer.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


def summarise(path: Path, top: int, contains: str | None) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if contains and contains not in stack:
            continue
        n = int(count)
        total += n
        frames = [_name(f) for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    out = [f"{total} samples"]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        out.append(f"\n-- {title} --")
        for name, n in counter.most_common(top):
            out.append(f"{100 * n / max(1, total):6.1f}%  {name}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--contains", help="only stacks containing this text")
    args = ap.parse_args()
    print(summarise(args.profile, args.top, args.contains))


if __name__ == "__main__":
    main()
