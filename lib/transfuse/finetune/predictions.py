"""A member's split outputs, ``<member_dir>/<kind>/<split>.parquet``: id, label and one float32 list per row
(``probs`` for predictions, ``embedding`` for embeddings). Training writes them for every CNN member, the
ensemble for its stack's test predictions, the distill stage for its student; the ensemble, the report and the
distill stage read them. This module is that format's one writer and reader, and the typed reader of a member
dir's ``metrics.json`` (``MemberMetrics``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from transfuse import storage
from transfuse.inference import EnsembleError
from transfuse.metrics import SplitMetrics
from transfuse.stage import read_metrics


def _read_table(path: str) -> Any:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    if not storage.exists(path):
        raise EnsembleError(f"missing file {path}")
    return pq.read_table(p, filesystem=fs)


def _list_column(table: Any, column: str, where: str) -> np.ndarray:
    """A list<float> column as an N x width float32 array; every row must have the same width."""
    import pyarrow.compute as pc

    if column not in table.column_names:
        raise EnsembleError(f"{where}: no column {column!r}; has {table.column_names}")
    col = table.column(column).combine_chunks()
    if col.null_count:
        raise EnsembleError(f"{where}: {col.null_count} rows have a null {column}")
    lengths = np.asarray(pc.list_value_length(col))
    if len(lengths) and lengths.min() != lengths.max():
        raise EnsembleError(f"{where}: {column} rows have different lengths ({lengths.min()}..{lengths.max()})")
    width = int(lengths[0]) if len(lengths) else 0
    return np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), width)


SPLIT_COLUMNS = {"predictions": "probs", "embeddings": "embedding"}  # <dir>/<kind>/<split>.parquet's value column


def write_member_split(member_dir: str, kind: str, split: str, ids: np.ndarray, labels: np.ndarray,
                       values: np.ndarray) -> None:
    """``<member_dir>/<kind>/<split>.parquet``: id (str), label (int64) and one float32 list per row (probs for
    predictions, embedding for embeddings), what ``read_member_split`` reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind not in SPLIT_COLUMNS:
        raise EnsembleError(f"split kind must be one of {sorted(SPLIT_COLUMNS)}, got {kind!r}")
    values = np.asarray(values, dtype=np.float32).reshape(len(ids), -1)
    table = pa.table({"id": pa.array(np.asarray(ids).astype(str)),
                      "label": pa.array(np.asarray(labels).astype(np.int64)),
                      SPLIT_COLUMNS[kind]: pa.array(list(values), type=pa.list_(pa.float32()))})
    fs, path = storage.resolve(storage.join(member_dir, kind, f"{split}.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)


def read_member_split(member_dir: str, kind: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, values) of ``<member_dir>/<kind>/<split>.parquet`` sorted by id; kind: predictions (probs) or
    embeddings (embedding)."""
    path = storage.join(member_dir, kind, f"{split}.parquet")
    table = _read_table(path)
    for c in ("id", "label"):
        if c not in table.column_names:
            raise EnsembleError(f"{path}: no column {c!r}; has {table.column_names}")
    ids = np.asarray(table.column("id").to_pylist(), dtype=str)
    labels = np.asarray(table.column("label"), dtype=np.int64)
    values = _list_column(table, SPLIT_COLUMNS[kind], path)
    if len(np.unique(ids)) != len(ids):
        raise EnsembleError(f"{path}: ids are not unique")
    order = np.argsort(ids, kind="stable")
    return ids[order], labels[order], values[order]


@dataclass(frozen=True)
class MemberMetrics:
    """A member dir's ``metrics.json`` (fine-tune, scratch, every Tune trial, the pretrained backbone), typed:
    val, test and (where evaluated) holdout metrics, the per-epoch history and the class-weighting decision; ``raw`` keeps the whole file."""

    val: Optional[SplitMetrics]
    test: Optional[SplitMetrics]
    holdout: Optional[SplitMetrics] = None
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs: Optional[int] = None
    class_weight: Optional[dict[str, Any]] = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "MemberMetrics":
        split = lambda k: SplitMetrics.from_json(d[k]) if isinstance(d.get(k), dict) else None  # noqa: E731
        return cls(val=split("val"), test=split("test"), holdout=split("holdout"),
                   history=list(d.get("history") or []), epochs=d.get("epochs"), class_weight=d.get("class_weight"),
                   raw=d)

    @classmethod
    def read(cls, member_dir: str) -> Optional["MemberMetrics"]:
        """The member's metrics, or None before it has written them."""
        d = read_metrics(member_dir)
        return None if d is None else cls.from_json(d)


__all__ = ["SPLIT_COLUMNS", "MemberMetrics", "read_member_split", "write_member_split"]
