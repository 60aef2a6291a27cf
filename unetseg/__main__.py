"""`python -m unetseg SUBCOMMAND`: see `unetseg.cli`."""

from unetseg.cli import main

raise SystemExit(main())
