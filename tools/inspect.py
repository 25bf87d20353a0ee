"""`python tools/inspect.py ...` is `lycoft-inspect ...` (`lycoft.cli.inspect`) run from a lycoft checkout."""

import sys

if __name__ == "inspect":
    # Running any tools/ script puts tools/ first on sys.path, so the standard library's `import inspect` (torch
    # makes one) loads this file: take tools/ off the path and import the real module in this one's place.
    import importlib
    import os

    sys.path[:] = [p for p in sys.path if os.path.abspath(p) != os.path.dirname(os.path.abspath(__file__))]
    del sys.modules["inspect"]
    importlib.import_module("inspect")
else:
    from lycoft.cli.inspect import main

    if __name__ == "__main__":
        sys.exit(main())
