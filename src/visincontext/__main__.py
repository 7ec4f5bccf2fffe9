"""`python -m visincontext COMMAND ...` (see `visincontext.cli`)."""

import sys

from .cli import main

sys.exit(main())
