"""``python -m lens_callbacks.cli``: the ``lens`` command without its entry point."""

from lens_callbacks.cli.main import main

raise SystemExit(main())
