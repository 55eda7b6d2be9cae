"""`python -m echelon` is the `echelon` command."""

import sys

from echelon.cli import main

sys.exit(main())
