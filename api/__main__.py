"""`python -m api`: the same as `sluice serve`."""

import sys

from api.cli import module_main

sys.exit(module_main())
