"""The command lines: `lycoft-merge`, `lycoft-convert`, `lycoft-inspect`, `lycoft-tiny-model`.

Each module parses arguments and calls the library (`lycoft.merge`, `lycoft.convert`,
`lycoft.inspect`, `lycoft.checkpoints`); `python tools/<name>.py` in a checkout runs the same `main`.
"""
