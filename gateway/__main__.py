"""`python -m gateway ...` is `gateway ...`."""

from gateway.ops.cli import main

raise SystemExit(main())
