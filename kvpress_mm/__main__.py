"""``python -m kvpress_mm``: the ``kvpress-mm`` command line."""

from kvpress_mm.apps.cli import main

raise SystemExit(main())
