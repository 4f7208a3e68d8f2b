"""The ``subpeft`` command line.

    subpeft methods          the registered methods: family, kind, mergeable, parameter formula
    subpeft methods --markdown   the same as the Markdown table of the README
    subpeft demo [...]       the main job: LoRA on MiniLM on the tweet sentiment task
    subpeft analyze DIR [--reference REF] [--out OUT] [--base minilm|module:factory] [--top K]
                             what a saved adapter does to each weight (subpeft.analysis)
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


def _classifier_labels(directory: str) -> int | None:
    """The number of labels of a saved classification head (modules_to_save), if the adapter has one."""
    from .core.io import read_tensors

    tensors, _ = read_tensors(directory)
    for key, value in tensors.items():
        if key.endswith("classifier.weight") and value.dim() == 2:
            return int(value.shape[0])
    return None


def _base_model(spec: str, directory: str):
    """A fresh base model: "minilm" (the bundled MiniLM classifier, labels read from the adapter's
    saved head, else 3) or "module:factory" (a callable returning the model)."""
    if spec == "minilm":
        from .train.models import load_minilm_classifier

        return load_minilm_classifier(_classifier_labels(directory) or 3)[0]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"subpeft analyze: --base must be 'minilm' or 'module:factory', got {spec!r}")
    import importlib

    factory = getattr(importlib.import_module(module_name), attr)
    return factory()


def _load_reference(path: str, base: str):
    """A fully fine-tuned reference: a weights file (.safetensors, .bin/.pt), a directory holding
    one (Hugging Face save_pretrained), or an adapter directory (loaded on a fresh base and merged)."""
    import os

    import torch

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            import subpeft as sp

            tuned = sp.load(_base_model(base, path), path)
            return tuned.merge_and_unload() if tuned.configs[tuned.active_adapter].mergeable else tuned.unload()
        for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.bin"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise SystemExit(f"subpeft analyze: no model.safetensors or pytorch_model.bin in {path!r}")
    if not os.path.exists(path):
        raise SystemExit(f"subpeft analyze: reference {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.state_dict() if hasattr(state, "state_dict") else state


def _analyze(args: argparse.Namespace) -> int:
    import os
    import time

    import subpeft as sp
    from subpeft import analysis

    if not os.path.exists(os.path.join(args.dir, "adapter_config.json")):
        raise SystemExit(f"subpeft analyze: {args.dir!r} is not an adapter directory (no adapter_config.json)")
    start = time.perf_counter()
    tuned = sp.load(_base_model(args.base, args.dir), args.dir)
    reference = _load_reference(args.reference, args.base) if args.reference else None
    rows = analysis.report(tuned, reference=reference, top=args.top)
    elapsed = time.perf_counter() - start
    print(f"adapter {args.dir}: {rows.method}, {len(rows)} adapted layers ({elapsed:.1f} s)")
    print(rows.to_table())
    summary = rows.summary()
    if "mean_quantile" in summary:
        print(
            f"top-{args.top} change-rate directions per layer: mean spectrum quantile {summary['mean_quantile']:.2f} "
            f"(0 = largest σ, 1 = smallest), {100 * summary['fraction_in_top_10pct']:.0f}% in the top 10%, "
            f"{100 * summary['fraction_in_bottom_10pct']:.0f}% in the bottom 10%"
        )
    if "mean_distance_to_reference" in summary:
        print(f"mean distance to the reference: {summary['mean_distance_to_reference']:.3f} (0 = reached it, 1 = untouched)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        rows.to_json(os.path.join(args.out, "report.json"))
        print(f"wrote {os.path.join(args.out, 'report.json')}")
        if not args.no_plots:
            try:
                files = analysis.plot_report(rows, args.out, label=os.path.basename(os.path.normpath(args.dir)))
            except ImportError as exc:
                print(f"no plots: {exc}", file=sys.stderr)
            else:
                print(f"wrote {len(files)} plots under {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="subpeft", description="Parameter-efficient fine-tuning, the subspace view.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_methods = sub.add_parser("methods", help="list the registered methods")
    p_methods.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_methods.add_argument("--markdown", action="store_true", help="print the README's Markdown table")
    sub.add_parser("demo", help="run the main job (LoRA on MiniLM, tweet sentiment)", add_help=False)
    p_an = sub.add_parser("analyze", help="what a saved adapter does to each weight (change rates, spectra)")
    p_an.add_argument("dir", help="adapter directory saved by subpeft (or Hugging Face PEFT)")
    p_an.add_argument("--reference", help="fully fine-tuned weights: a directory (save_pretrained or adapter) or a file")
    p_an.add_argument("--out", help="directory for report.json and PNG plots")
    p_an.add_argument("--base", default="minilm", help="base model: 'minilm' (default) or 'module:factory'")
    p_an.add_argument("--top", type=int, default=8, help="task-specific directions per layer (default 8)")
    p_an.add_argument("--no-plots", action="store_true", help="with --out, write report.json only")
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:]) or 0
    args = parser.parse_args(argv)
    if args.command == "methods":
        return _methods(args)
    if args.command == "analyze":
        return _analyze(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
