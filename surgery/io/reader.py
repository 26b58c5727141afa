"""Lazy reader: one tensor at a time, at most one shard open, in shard order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from io import BufferedReader
from pathlib import Path

import torch

from ..errors import CheckpointError
from .guards import escape_name, open_regular
from .index import CheckpointIndex, TensorInfo, safe_torch_load


class LazyReader:
    """Reads tensors of an indexed checkpoint on demand.

    safetensors: each tensor is read with one seek + readinto into its own
    buffer, so memory is the tensor itself. torch files: the shard is mapped
    (torch.load(mmap=True)), so pages are read only when touched.
    """

    def __init__(self, index: CheckpointIndex):
        self.index = index
        self._shard: Path | None = None
        self._fh: BufferedReader | None = None
        self._sd: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> LazyReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh, self._sd, self._shard = None, None, None

    def _open(self, shard: Path) -> None:
        if self._shard == shard:
            return
        self.close()
        if self.index.format == "safetensors":
            self._fh = open_regular(shard)  # never blocks on a FIFO swapped in since indexing
        else:
            self._sd = safe_torch_load(shard, mmap=True)
        self._shard = shard

    def info(self, name: str) -> TensorInfo:
        try:
            return self.index.tensors[name]
        except KeyError:
            raise CheckpointError(
                f"{escape_name(self.index.root)}: no tensor named '{escape_name(name, 200)}'"
            ) from None

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        self._open(info.shard)
        if self._sd is not None:
            return self._sd[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        assert self._fh is not None  # a safetensors shard: _open opened it
        self._fh.seek(info.offset)
        got = self._fh.readinto(buf.numpy().data) if info.nbytes else 0
        if got != info.nbytes:
            raise CheckpointError(
                f"{escape_name(info.shard)}: tensor '{escape_name(name, 200)}' is truncated "
                f"({got} of {info.nbytes} bytes); re-download the checkpoint"
            )
        return buf.view(info.dtype).reshape(info.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along the first dimension, reading only their bytes."""
        info = self.info(name)
        if not info.shape:
            raise CheckpointError(f"'{escape_name(name, 200)}' is a scalar; it has no rows")
        start, stop = max(0, start), min(stop, info.shape[0])
        self._open(info.shard)
        if self._sd is not None:
            return self._sd[name][start:stop]
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        n = max(0, stop - start) * row
        buf = torch.empty(n, dtype=torch.uint8)
        assert self._fh is not None  # a safetensors shard: _open opened it
        self._fh.seek(info.offset + start * row)
        got = self._fh.readinto(buf.numpy().data) if n else 0
        if got != n:
            raise CheckpointError(
                f"{escape_name(info.shard)}: tensor '{escape_name(name, 200)}' is truncated; re-download the checkpoint"
            )
        return buf.view(info.dtype).reshape((max(0, stop - start), *info.shape[1:]))

    def order(self, names: Iterable[str] | None = None) -> list[str]:
        """Names sorted so each shard is visited once, data in file order."""
        names = list(self.index.tensors) if names is None else list(names)
        rank = {s: i for i, s in enumerate(self.index.shards)}
        return sorted(names, key=lambda n: (rank[self.info(n).shard], self.info(n).offset))

    def iter(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.order(names):
            yield name, self.get(name)
