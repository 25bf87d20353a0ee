"""Readers and writers of adapter and checkpoint files."""

from lycoft.formats.atomic import atomic_write as atomic_write
from lycoft.formats.atomic import refuse_overwrite as refuse_overwrite
from lycoft.formats.atomic import same_file as same_file
from lycoft.formats.errors import AdapterFileError as AdapterFileError
from lycoft.formats.errors import UnsafeCheckpointError as UnsafeCheckpointError
from lycoft.formats.safe_io import SafetensorsReader as SafetensorsReader
from lycoft.formats.safe_io import TensorInfo as TensorInfo
from lycoft.formats.safe_io import open_safetensors as open_safetensors
from lycoft.formats.safe_io import read_safetensors as read_safetensors
from lycoft.formats.safe_io import read_safetensors_header as read_safetensors_header
from lycoft.formats.safe_io import save_safetensors_atomic as save_safetensors_atomic
from lycoft.formats.torch_checkpoint import load_torch_checkpoint as load_torch_checkpoint
