"""``python -m services.pilot``: run a pilot configured by its environment."""

import sys

from services.pilot.run import main

sys.exit(main())
