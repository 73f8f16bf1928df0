"""`python -m frugalm` runs the CLI."""

import sys

from frugalm.cli import main

sys.exit(main())
