"""`python -m gateway ...` is `gateway ...`."""

from .cli import main

raise SystemExit(main())
