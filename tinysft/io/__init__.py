"""File formats: safetensors tensors, crash-safe writes and training checkpoints."""

from tinysft.io.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from tinysft.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinysft.io.safetensors import SafetensorsError, SafetensorsFile, load_file, save_file

__all__ = [
    "atomic_open", "atomic_write_bytes", "atomic_write_text",
    "CheckpointError", "load_checkpoint", "save_checkpoint",
    "SafetensorsError", "SafetensorsFile", "load_file", "save_file",
]
