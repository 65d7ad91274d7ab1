"""`python -m pgupkeep`."""

from pgupkeep.cli import main

raise SystemExit(main())
