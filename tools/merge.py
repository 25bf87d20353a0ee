"""`python tools/merge.py ...` is `lycoft-merge ...` (`lycoft.cli.merge`) run from a lycoft checkout."""

import sys

from lycoft.cli.merge import main

if __name__ == "__main__":
    sys.exit(main())
