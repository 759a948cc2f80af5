"""Command line: ``python -m models demo --out DIR``.

``demo`` samples a 2-D energy-tilted prior with a known answer and writes ``prior_samples.png`` and
``prior_summary.json`` to ``DIR``. (Training commands arrive with the LEBM models.)
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description="tilted-priors models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample a 2-D tilted prior with a known answer and plot it")
    demo.add_argument("--out", default="demo-output", help="output folder")
    demo.add_argument("--num", type=int, default=2000, help="number of chains")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.num < 1:
            parser.error("--num must be positive")
        from models.demo import run_demo

        summary = run_demo(args.out, num=args.num, seed=args.seed)
        print(json.dumps(summary, indent=2))
        print(f"wrote {args.out}/prior_samples.png and {args.out}/prior_summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
