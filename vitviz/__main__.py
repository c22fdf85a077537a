"""``python -m vitviz`` runs the CLI."""

from .cli import main

raise SystemExit(main())
