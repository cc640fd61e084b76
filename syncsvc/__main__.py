"""``python -m syncsvc`` is the ``syncsvc`` command."""

import sys

from syncsvc.cli import main

if __name__ == "__main__":
    sys.exit(main())
