"""``python -m sluicegate`` is ``sluice``."""

import sys

from sluicegate.cli import main

sys.exit(main())
