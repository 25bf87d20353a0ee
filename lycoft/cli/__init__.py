"""The command lines: `lycoft-merge`, `lycoft-convert`, `lycoft-inspect`, `lycoft-tiny-model`.

Each module parses arguments and calls the library (`lycoft.merge`, `lycoft.convert`,
`lycoft.inspect`, `lycoft.checkpoints`); `python tools/<name>.py` in a checkout runs the same `main`.
Every `main` ends through `runner.run_command`, which turns user errors into one line and exit status 2;
`argtypes` holds the checked number types of their flags.
"""
