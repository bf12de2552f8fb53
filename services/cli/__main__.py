"""``python -m services.cli`` runs the ``ewms`` command."""

import sys

from services.cli import main

sys.exit(main())
