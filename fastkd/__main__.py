"""``python -m fastkd``: the ``fastkd`` command."""

import sys

from fastkd.cli import main

raise SystemExit(main())
