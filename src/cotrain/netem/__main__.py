"""``python -m cotrain.netem cleanup``: remove namespaces that dead netem runs left behind."""

from __future__ import annotations

import argparse
import sys

from cotrain.netem.netns import PREFIX, cleanup_leftovers, netns_unavailable_reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cotrain.netem")
    sub = parser.add_subparsers(dest="command", required=True)
    clean = sub.add_parser(
        "cleanup",
        help=f"delete {PREFIX}* namespaces, their processes and temp folders of dead runs",
    )
    clean.add_argument(
        "--include-live",
        action="store_true",
        help="also delete namespaces of runs whose process is still alive",
    )
    args = parser.parse_args(argv)
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"cannot clean up: {reason}", file=sys.stderr)
        return 1
    removed = cleanup_leftovers(include_live=args.include_live)
    for name in removed:
        print(f"removed {name}")
    print(f"{len(removed)} leftover(s) removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
