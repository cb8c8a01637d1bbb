"""``python3 -m batchscore_runtime``: score one mini-batch (see :mod:`batchscore_runtime.azure`)."""

import sys

from batchscore_runtime.azure import main

# Guarded: worker processes are spawned, and a spawned child imports this module again.
if __name__ == "__main__":
    sys.exit(main())
