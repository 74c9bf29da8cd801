"""``python -m streamv2v``: see :mod:`streamv2v.cli`."""

from .cli import main

raise SystemExit(main())
