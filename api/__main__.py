"""`python -m api`: the same as `sluice serve`."""

import sys

from api.cli import module_main

if __name__ == "__main__":  # the engine's spawned child must not start another server
    sys.exit(module_main())
