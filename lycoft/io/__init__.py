"""Bytes on disk: hardened safetensors reading, atomic writes, streaming rewrite, the safe torch-checkpoint
reader, and the errors they raise. Imports nothing else of lycoft, so every floor above may use it."""

from lycoft.io.atomic import atomic_write as atomic_write
from lycoft.io.atomic import refuse_overwrite as refuse_overwrite
from lycoft.io.atomic import same_file as same_file
from lycoft.io.errors import AdapterFileError as AdapterFileError
from lycoft.io.errors import UnsafeCheckpointError as UnsafeCheckpointError
from lycoft.io.safe_io import SafetensorsReader as SafetensorsReader
from lycoft.io.safe_io import TensorInfo as TensorInfo
from lycoft.io.safe_io import open_safetensors as open_safetensors
from lycoft.io.safe_io import read_safetensors as read_safetensors
from lycoft.io.safe_io import read_safetensors_header as read_safetensors_header
from lycoft.io.safe_io import save_safetensors_atomic as save_safetensors_atomic
from lycoft.io.torch_checkpoint import load_torch_checkpoint as load_torch_checkpoint
