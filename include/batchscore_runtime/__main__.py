"""``python3 -m batchscore_runtime``: score one mini-batch (see :mod:`batchscore_runtime.azure`)."""

import sys

from batchscore_runtime.azure import main

sys.exit(main())
