"""The ``subpeft`` command line.

    subpeft methods          the registered methods: family, kind, mergeable, parameter formula
    subpeft methods --markdown   the same as the Markdown table of the README
    subpeft demo [...]       the main job: LoRA on MiniLM on the tweet sentiment task
"""

from __future__ import annotations

import argparse
import sys


def _methods(args: argparse.Namespace) -> int:
    import subpeft as sp

    rows = [m.as_row() for m in sp.list_methods()]
    if args.markdown:
        print(methods_markdown())
        return 0
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    header = ("method", "family", "kind", "mergeable", "params per layer", "layer types")
    table = [header] + [
        (r["name"], r["family"], r["kind"], "yes" if r["mergeable"] else "no", r["formula"], ", ".join(r["layer_types"]))
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def methods_markdown() -> str:
    """The README's method table, generated from the registry (a test keeps the README in sync)."""
    import subpeft as sp

    lines = [
        "| method | config | family | trains | params per adapted layer | merges | layer types |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in sp.list_methods():
        lines.append(
            f"| `{m.name}` | `sp.{m.config_cls.__name__}` | {m.family} | {m.trains} | {m.formula} | "
            f"{'yes' if m.mergeable else 'no'} | {', '.join(m.layer_types)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="subpeft", description="Parameter-efficient fine-tuning, the subspace view.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_methods = sub.add_parser("methods", help="list the registered methods")
    p_methods.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_methods.add_argument("--markdown", action="store_true", help="print the README's Markdown table")
    sub.add_parser("demo", help="run the main job (LoRA on MiniLM, tweet sentiment)", add_help=False)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:]) or 0
    args = parser.parse_args(argv)
    if args.command == "methods":
        return _methods(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
