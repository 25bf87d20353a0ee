"""How every command line ends, and its exit status (docs/tools.md, "Exit codes").

- 0: done.
- 2: a mistake the user can fix: a bad flag value, a missing, damaged or unsafe file, a model that does not
  fit, a full disk, a missing optional package. One line on stderr (``error: ...``) names the value or
  file and what to do; no traceback. (argparse reports bad flags the same way, with the usage.)
- 1: an internal error, i.e. a bug in lycoft: the traceback, then a line saying so.
- 130: interrupted (Ctrl-C); nothing was written: outputs are only put in place when complete.

The library signals user mistakes with `ValueError` (`AdapterFileError`, `ConfigError`...) and `OSError`
(`DiskFullError`, missing and unwritable paths); anything else escaping a command is a bug.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from .._version import __version__
from ..merge import MergeVerificationError

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MergeVerificationError)


def _is_user_error(error: BaseException) -> bool:
    if isinstance(error, USER_ERRORS):
        return True
    # A missing optional package (matplotlib for --plot...) is the user's to install; a missing part of
    # lycoft itself is a broken install or a bug.
    return isinstance(error, ImportError) and bool(error.name) and not str(error.name).startswith("lycoft")


def run_command(prog: str, work: Callable[[], int | None]) -> int:
    """Run `work` (parse the arguments, do the job, print the result) and map how it ends to an exit status.

    Returns `work`'s status (None: 0). argparse's own exit on bad flags (SystemExit 2) passes through.
    """
    try:
        return work() or EXIT_OK
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written (outputs are only put in place when complete)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if _is_user_error(e):
            print(f"error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
            return EXIT_USER_ERROR
        traceback.print_exc()
        print(f"{prog}: internal error: this is a bug in lycoft {__version__}, not a problem with your files or "
              "flags; please report it with the traceback above and the command line", file=sys.stderr)
        return EXIT_BUG
