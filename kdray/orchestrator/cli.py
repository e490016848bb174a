"""``python -m kdray.orchestrator.cli`` and ``kdray.orchestrator.cli:main`` kept working for scripts and tests
that name them; the command line is :mod:`kdray.cli`, above both the orchestrator and search."""
import sys

from kdray.cli import build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
