"""``python -m fastkd``: the ``fastkd`` command."""

from fastkd.cli import main

raise SystemExit(main())
