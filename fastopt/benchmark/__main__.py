"""``python -m fastopt.benchmark``: the same as ``fastopt bench``."""

from .cli import main

raise SystemExit(main())
