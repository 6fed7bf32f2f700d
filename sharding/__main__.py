"""``python -m sharding plan ...``: see `sharding.cli`."""

from sharding.cli import main

raise SystemExit(main())
