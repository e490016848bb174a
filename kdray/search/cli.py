"""``kdray sweep CONFIG.yaml [key.path=value ...] [--resume]``: run (or finish) a search."""
from __future__ import annotations


def _cmd_sweep(args) -> int:
    from kdray.search.api import sweep_file

    result = sweep_file(args.config, overrides=args.overrides, resume=args.resume)
    try:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(result.summary()))
    except ImportError:  # pragma: no cover
        print(result.summary())
    if result.best_config:
        print(f"\nBest configuration: {result.best['name']}  {result.best_params}")
    if result.tracking_uri:
        print(f"MLflow: {result.tracking_uri}  (sweep run {result.parent_run_id})")
    if result.registered:
        print(f"Registered model: {result.registered['uri']} (alias champion)")
    for note in result.notes:
        print(f"note: {note}")
    print(f"Sweep directory: {result.path}")
    return 0


def add_parser(subparsers) -> None:
    """Add ``sweep`` to ``kdray``'s sub-commands."""
    p = subparsers.add_parser("sweep", help="search students and distillation hyper-parameters (Tune + Optuna)")
    p.add_argument("config", help="sweep YAML (base:, space:, search:), or a packaged example (digits_sweep)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the sweep file, "
                                                "e.g. search.num_samples=8")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted sweep (Tuner.restore; reopens its MLflow run)")
    p.set_defaults(func=_cmd_sweep)
