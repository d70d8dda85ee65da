"""Entry point for ``python -m qlorakit``; same as the ``qlorakit`` console script."""

from qlorakit.cli.main import main

raise SystemExit(main())
