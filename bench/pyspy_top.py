"""The top entries of a py-spy profile recorded with --format raw.

    python bench/pyspy_top.py PROFILE.txt [--top 25] [--thread MainThread]

Prints, as percentages of all samples of the chosen threads, the functions
with the most samples of their own (self) and those on the stack most
often (total, each function counted once per sample).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "wt-perf/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--thread", default="", help="only stacks whose thread frame contains this")
    args = p.parse_args()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    with open(args.profile) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue  # a stack cut off (py-spy writes very long ones in pieces)
            count = int(count_text)
            frames = stack.split(";")
            thread = frames[0]
            threads[thread] += count
            if args.thread and args.thread not in thread:
                continue
            samples += count
            names = [short(fr) for fr in frames[1:]] or [thread]
            own[names[-1]] += count
            for name in set(names):
                total[name] += count
    print(f"{samples} samples; by thread:")
    for thread, n in threads.most_common(10):
        print(f"  {n:7d}  {thread}")
    for title, counter in (("self", own), ("total", total)):
        print(f"\ntop {args.top} by {title} time:")
        for name, n in counter.most_common(args.top):
            print(f"  {100 * n / max(samples, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
