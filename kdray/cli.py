"""``kdray`` command line: ``run``, ``list``, ``ui``, ``runs``, ``cache``, ``sweep``, ``nas``. User errors are one line
(``--debug`` for a traceback). The one module that imports both the orchestrator and search (the layer above it).

Exit codes: 0 done, 2 a user error, 130 Ctrl-C, 143 SIGTERM (the runs KILLED, ``--resume`` continues)."""
from __future__ import annotations

import argparse
import sys

from kdray.orchestrator import stale_runs
from kdray.orchestrator.interrupts import TERM_EXIT_CODE, Terminated, as_received, sigterm_handled

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ConnectionError, FloatingPointError)


def _cmd_run(args) -> int:
    from kdray.orchestrator.api import distill

    result = distill(args.config, overrides=args.overrides, resume=args.resume)
    _print_table(result.table())
    if result.tracking_uri:
        print(f"\nMLflow: {result.tracking_uri}  (job run {result.parent_run_id})")
        print(f"Open the UI: kdray ui{'' if result.tracking_uri.endswith('/mlflow.db') else ' --store ' + result.tracking_uri}")
    print(f"Checkpoints: {result.run_dir}")
    return 0


def _print_table(markdown: str) -> None:
    try:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(markdown))
    except ImportError:  # pragma: no cover
        print(markdown)


def _cmd_list(args) -> int:
    if args.what == "models":
        from kdray.models import list_models, model_family

        for name in list_models(args.pattern, include_torchvision=args.torchvision):
            print(f"{name}\t{model_family(name)}")
    elif args.what == "datasets":
        from kdray.data import list_datasets

        for name, desc in list_datasets().items():
            print(f"{name}\t{desc}")
    elif args.what == "methods":
        from kdray.algorithms import list_methods

        for name, cls in list_methods().items():
            print(f"{name}\t{cls.kind}\t{cls.paper}")
    elif args.what == "optimizers":
        from kdray.algorithms.optim import OPTIMIZER_HELP

        for name, text in OPTIMIZER_HELP.items():
            print(f"{name}\t{text}")
    elif args.what == "schemes":
        from kdray.orchestrator.plan import list_schemes

        for name, scheme in list_schemes().items():
            print(f"{name}\t{scheme.help}")
    return 0


def _cmd_ui(args) -> int:
    import subprocess

    from kdray.orchestrator.tracking import resolve_tracking_uri, training_runs_links

    uri = resolve_tracking_uri(args.store)
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI: {uri}")
        for name, link in training_runs_links(uri, uri):
            print(f"  {name}: {link}")
        return 0
    print(f"MLflow UI for {uri}: http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    for name, link in training_runs_links(uri, f"http://{args.host}:{args.port}"):  # the training-runs view
        print(f"  {name}: {link}", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdray", description="Distributed knowledge distillation on Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a distillation job")
    run.add_argument("config", help="YAML file, or a packaged example name (digits)")
    run.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. ray.num_workers=2")
    run.add_argument("--resume", action="store_true", help="continue the job from its last checkpoint")
    run.set_defaults(func=_cmd_run)

    lst = sub.add_parser("list", help="list models, datasets, methods, optimizers or schemes")
    lst.add_argument("what", choices=["models", "datasets", "methods", "optimizers", "schemes"])
    lst.add_argument("pattern", nargs="?", default="*", help="shell pattern for models, e.g. 'resnet*'")
    lst.add_argument("--torchvision", action="store_true", help="include torchvision models")
    lst.set_defaults(func=_cmd_list)

    ui = sub.add_parser("ui", help="open the MLflow UI on the configured store")
    ui.add_argument("--store", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=_cmd_ui)
    stale_runs.add_parser(sub)
    __import__("kdray.orchestrator.teacher_cache", fromlist=["add_parser"]).add_parser(sub)
    __import__("kdray.search.cli", fromlist=["add_parser"]).add_parser(sub)  # kdray sweep
    __import__("kdray.search.blockwise", fromlist=["add_parser"]).add_parser(sub)  # kdray nas
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_handled():  # SIGTERM (`ray job stop`, Kubernetes) stops a job like Ctrl-C, not mid-write
            return args.func(args)
    except KeyboardInterrupt as caught:
        err = as_received(caught)
        print(f"kdray: interrupted{f' ({err})' if str(err) else ''}", file=sys.stderr)
        return TERM_EXIT_CODE if isinstance(err, Terminated) else 130
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"kdray: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
