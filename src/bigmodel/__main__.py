"""`python -m bigmodel ...` (and `torchrun -m bigmodel ...`)."""

from bigmodel.cli import main

raise SystemExit(main())
