"""``python -m egp_fast.cli``: the ``egp-fast`` command."""

import sys

from egp_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
