"""One copy of the weights for all the ONNX graphs of an export.

The exporter writes each graph with its own external-data file, so prefill and decode (and their INT4 twins)
would each carry the decoder's weights. `WeightPool.add(graph.onnx)` moves every stored tensor of one graph
into the export's single `weights.onnx.data`, keyed by content (the exporter's optimizer renames folded weights,
so names cannot be trusted to match), points the graph's initializers at it and deletes the graph's own data file.
The graphs stay ordinary ONNX: any ONNX consumer (onnxruntime, TensorRT's parser) reads them as they are.

At run time onnxruntime maps the file's large tensors in place (they start on 64 KiB boundaries), so the sessions
of one process share those pages: one copy in memory, however many graphs read it. Its CPU kernels may still
pre-pack a MatMul's weight into a private copy per session; `session_options(prepack=False)` turns that off.
(`add_external_initializers_from_files_in_memory` is no help here: onnxruntime copies out of the buffer it gets.)
"""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "weights.onnx.data"
INLINE_MAX = 1024  # tensors up to this many bytes stay inside the .onnx file (as the exporter leaves them)
PAGE_ALIGN = 1 << 16  # large tensors start on a 64 KiB boundary so onnxruntime can map them in place
PAGE_ALIGN_FROM = 1 << 20  # ... from this size on; smaller ones are aligned to 64 bytes
SMALL_ALIGN = 64


@dataclass
class WeightPool:
    """The export's weight file while graphs are added; `stats` counts what sharing saved."""

    root: Path
    name: str = WEIGHTS_FILE
    _offsets: dict[tuple, int] = field(default_factory=dict)  # content key -> offset in the pool
    stats: dict[str, int] = field(default_factory=lambda: {"tensors": 0, "unique": 0, "bytes_in": 0,
                                                            "bytes_out": 0})

    def __post_init__(self) -> None:
        if self.path.exists():  # left by an earlier attempt in this directory: its offsets are unknown
            self.path.unlink()

    @property
    def path(self) -> Path:
        return self.root / self.name

    def add(self, graph: Path) -> dict[str, int]:
        """Move `graph`'s stored tensors into the pool (in place); returns this graph's counts."""
        import onnx

        model = onnx.load(str(graph), load_external_data=False)
        sources: dict[str, Any] = {}  # the graph's own external-data files, mapped once each
        moved = {"tensors": 0, "bytes": 0, "new_bytes": 0}  # this graph's stored tensors; bytes new to the pool
        try:
            with open(self.path, "ab") as pool:
                for tensor in _stored_tensors(model):
                    data = _tensor_bytes(tensor, graph.parent, sources)
                    if data is None or (tensor.data_location != onnx.TensorProto.EXTERNAL and len(data) <= INLINE_MAX):
                        continue
                    key = (tensor.data_type, tuple(tensor.dims), len(data), hashlib.blake2b(data).digest())
                    offset = self._offsets.get(key)
                    if offset is None:
                        offset = _append_aligned(pool, data)
                        self._offsets[key] = offset
                        self.stats["unique"] += 1
                        self.stats["bytes_out"] += len(data)
                        moved["new_bytes"] += len(data)
                    _point_at(tensor, self.name, offset, len(data))
                    self.stats["tensors"] += 1
                    self.stats["bytes_in"] += len(data)
                    moved["tensors"] += 1
                    moved["bytes"] += len(data)
        finally:
            for mapped, handle in sources.values():
                mapped.close()
                handle.close()
        own_files = {graph.parent / loc for loc in sources} - {self.path}
        onnx.save_model(model, str(graph))
        for f in own_files:
            f.unlink()
        return moved


def _stored_tensors(model: Any) -> list[Any]:
    """Initializers of the graph and of every subgraph (the exporter writes none, but a graph may have them)."""
    out: list[Any] = []

    def visit(graph: Any) -> None:
        out.extend(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.g is not None and attr.g.ByteSize():
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    return out


def stored_bytes(model: Any) -> int:
    """Bytes of every tensor a graph stores, in its weight file or inline."""
    total = 0
    for tensor in _stored_tensors(model):
        ext = _external(tensor)
        total += int(ext["length"]) if "length" in ext else len(tensor.raw_data)
    return total


def _external(tensor: Any) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _tensor_bytes(tensor: Any, base: Path, sources: dict[str, Any]) -> bytes | None:
    """A stored tensor's bytes, from its external file (mapped, not read whole) or its raw_data."""
    import onnx

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        ext = _external(tensor)
        loc = ext["location"]
        if loc not in sources:
            handle = open(base / loc, "rb")
            sources[loc] = (mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), handle)
        offset = int(ext.get("offset", 0))
        length = int(ext["length"]) if "length" in ext else len(sources[loc][0]) - offset
        return bytes(sources[loc][0][offset:offset + length])
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return None  # typed fields (float_data...) are small constants the exporter keeps inline


def _append_aligned(pool: Any, data: bytes) -> int:
    align = PAGE_ALIGN if len(data) >= PAGE_ALIGN_FROM else SMALL_ALIGN
    end = pool.seek(0, 2)
    pad = -end % align
    pool.write(b"\0" * pad)
    pool.write(data)
    return end + pad


def _point_at(tensor: Any, location: str, offset: int, length: int) -> None:
    import onnx

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def session_options(opts: Any, prepack: bool) -> Any:
    """onnxruntime maps the weight file's page-aligned tensors in place, so the sessions of one process read the
    same pages (one copy in memory). Its CPU kernels pre-pack MatMul weights into a private copy per session;
    `prepack=False` turns that off and keeps the one mapped copy (see the README's figures for the cost)."""
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts
