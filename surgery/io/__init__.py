"""Checkpoint I/O: index from headers, lazy reader, streaming atomic writer."""

from .guards import escape_name, load_json
from .index import CheckpointIndex, TensorInfo, open_checkpoint, safe_torch_load
from .reader import LazyReader
from .writer import (
                     ShardedWriter,
                     atomic_output_dir,
                     check_output_path,
                     check_report_path,
                     non_weight_files,
                     parse_size,
                     write_text_atomic,
)

__all__ = [
    "CheckpointIndex", "TensorInfo", "open_checkpoint", "safe_torch_load", "LazyReader",
    "ShardedWriter", "atomic_output_dir", "check_output_path", "check_report_path", "non_weight_files",
    "parse_size", "write_text_atomic", "escape_name", "load_json",
]
