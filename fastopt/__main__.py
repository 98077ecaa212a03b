"""``python -m fastopt``: the ``fastopt`` command."""

from .cli import main

raise SystemExit(main())
