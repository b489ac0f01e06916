"""Frozen layers computed once: activations at the cut point, cached as parquet and shared between runs.

Training a head on a frozen base recomputes the whole base every epoch in the naive recipe. Here the
activations at the cut point (output of the last frozen layer) are computed once with Ray Data
``map_batches`` on an actor pool (one actor per GPU on a cluster), in a single pass in which the actors write
the parquet files themselves (no activations through the object store, no second pass), and stored under
``<storage>/<run>/cache/<key>/{train,val}/`` with a manifest. Small data on CPUs (``in_driver_max_rows``)
is computed by the same code in the calling process instead: there the actor's start-up (a new process
importing TensorFlow) cost more than the pass itself. The key hashes the backbone, width, cut layer,
input size, the trunk's weight values and the dataset's fingerprint, so a run or Tune trial with the same cut
reuses it. Two builders starting at once build it once on local storage (an fcntl lock, then write to a
temporary directory and rename); on object stores the manifest written last marks completion.

The same actor class also applies a finished model to every split (probabilities and embeddings).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any, Iterator, Optional

import numpy as np

from transfuse import storage
from transfuse.finetune import CACHE
from transfuse.inference import PreprocessSpec, preprocess

log = logging.getLogger(__name__)

PROFILE: dict[str, float] = {}  # where the last cache pass in this process spent its time (bench, logs)


class ApplyModel:
    """Ray Data actor: canonical rows (image, label, id) -> chosen model outputs, one column per output.

    ``outputs`` names backbone layers (activations at a cut point) or the special "probs" and "embedding".
    The model is rebuilt from its spec and a full-model weights file (no code loaded from files).
    """

    def __init__(self, spec: dict[str, Any], weights_path: str, outputs: list[str]) -> None:
        from transfuse import environment  # noqa: F401  (tf_keras in this actor)
        import tensorflow as tf

        from transfuse.finetune import models

        tf.keras.mixed_precision.set_global_policy("float32")  # cache and evaluate in float32
        model = models.build_model(spec, None)
        models.load_weights(model, weights_path)
        tensors = []
        for name in outputs:
            if name == "probs":
                tensors.append(model.output)
            elif name == "embedding":
                tensors.append(models.embedding_model(model).output)
            else:
                tensors.append(models.trunk_model(model, name)(model.input))
        fn = tf.keras.Model(model.input, tensors)
        size = spec["input_size"]
        # one compiled graph for every batch (the last, smaller batch included): ~20% faster than eager calls
        self._fn = tf.function(lambda x: fn(x, training=False),
                               input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])
        self._outputs = outputs
        self._spec = PreprocessSpec(**spec["preprocess"])

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = np.stack(list(batch["image"])) if batch["image"].dtype == object else batch["image"]
        x = preprocess(images, self._spec)
        outs = self._fn(np.ascontiguousarray(x, dtype=np.float32))
        if len(self._outputs) == 1:
            outs = [outs]
        result = {f"out{i}": np.asarray(o, dtype=np.float32) for i, o in enumerate(outs)}
        result["label"] = np.asarray(batch["label"], dtype=np.int64)
        result["id"] = np.asarray(batch["id"])
        if "path" in batch:
            result["split"] = _split_of(np.asarray(batch["path"]))
        return result


class CacheWriter(ApplyModel):
    """Ray Data actor: activations at the cut points, written by the actor itself as parquet, one file per
    batch, split and cut (``<dir>/<split>/part-<uuid>.parquet``: x, label, id). Only each row's split name
    flows back (for the counts): one pass over the data, and no activations through the object store."""

    def __init__(self, spec: dict[str, Any], weights_path: str, outputs: list[str], out_dirs: list[str]) -> None:
        t = time.perf_counter()
        super().__init__(spec, weights_path, outputs)
        self._dirs = out_dirs
        self._init_s = time.perf_counter() - t  # TensorFlow import + model build, reported with the first batch

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        t = time.perf_counter()
        res = super().__call__(batch)
        t_model = time.perf_counter() - t
        write_parts(self._dirs, res)
        n = len(res["split"])
        # seconds spent here, spread over the batch's rows so that the driver's sums are the actor's totals
        timing = {"model_s": np.full(n, t_model / n), "write_s": np.full(n, (time.perf_counter() - t - t_model) / n),
                  "init_s": np.full(n, self._init_s / n)}
        self._init_s = 0.0
        return {"split": res["split"], **timing}


def write_parts(out_dirs: list[str], res: dict[str, Any]) -> None:
    """One parquet file per split and cut for a batch of outputs (out0.., label, id, split)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    part = uuid.uuid4().hex
    for split in np.unique(res["split"]):
        mask = res["split"] == split
        for i, out_dir in enumerate(out_dirs):
            table = pa.table({"x": ArrowTensorArray.from_numpy(res[f"out{i}"][mask]),
                              "label": pa.array(res["label"][mask]), "id": pa.array(res["id"][mask].astype(str))})
            fs, p = storage.resolve(storage.join(out_dir, str(split), f"part-{part}.parquet"))
            fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(p) as f:
                pq.write_table(table, f)


def _driver_rows(data_dir: str, splits: Any, *, actors: int, use_gpu: bool, max_rows: int) -> Optional[int]:
    """Rows of ``splits`` when they are small enough to run ``ApplyModel`` in this process (no GPU, one actor
    asked for, at most ``max_rows`` rows by the data manifest's totals); None: use the actor pool."""
    from transfuse.data import data_manifest

    if use_gpu or actors != 1:
        return None
    totals = data_manifest(data_dir).get("totals", {})
    rows = sum(int(totals.get(s, 0)) for s in splits)
    return rows if totals and rows <= max_rows else None


def _driver_batches(fn: ApplyModel, data_dir: str, split: str, batch_size: int) -> Iterator[dict[str, Any]]:
    """``fn``'s outputs on one split, batch by batch, in id order (the driver path). The split is read before the
    first batch is asked for, so a caller timing each batch times the model alone."""
    from transfuse.data import read_split_numpy

    images, labels, ids = read_split_numpy(data_dir, split)
    return _batches(fn, images, labels, ids, batch_size)


def _batches(fn: ApplyModel, images: np.ndarray, labels: np.ndarray, ids: np.ndarray,
             batch_size: int) -> Iterator[dict[str, Any]]:
    for i in range(0, len(labels), batch_size):
        yield fn({"image": images[i:i + batch_size], "label": labels[i:i + batch_size], "id": ids[i:i + batch_size]})


def _compute_in_driver(data_dir: str, splits: tuple[str, ...], spec: dict[str, Any], weights_path: str,
                       names: list[str], out_dirs: list[str], batch_size: int) -> dict[str, int]:
    """The same model and files as the actor pool, computed in this process (small data on CPUs: no actor
    start-up, no second TensorFlow import). Returns rows per split."""
    t0 = time.perf_counter()
    fn = ApplyModel(spec, weights_path, names)
    spent = {"init_s": time.perf_counter() - t0, "model_s": 0.0, "write_s": 0.0}
    counts = dict.fromkeys(splits, 0)
    for split in splits:
        batches = _driver_batches(fn, data_dir, split, batch_size)  # reads the split (not timed as model)
        t = time.perf_counter()
        for res in batches:
            res["split"] = np.full(len(res["label"]), split)
            spent["model_s"] += time.perf_counter() - t
            t = time.perf_counter()
            write_parts(out_dirs, res)
            spent["write_s"] += time.perf_counter() - t
            counts[split] += len(res["label"])
            t = time.perf_counter()
    PROFILE.clear()
    PROFILE.update(where="driver", pass_s=time.perf_counter() - t0, first_batch_s=spent["init_s"],
                   rows=sum(counts.values()), **{f"actor_{k}": v for k, v in spent.items()})
    return counts


def _compute_with_actors(data_dir: str, splits: tuple[str, ...], spec: dict[str, Any], weights_path: str,
                         names: list[str], out_dirs: list[str], actors: int, batch_size: int,
                         use_gpu: bool, actor_cpus: float) -> dict[str, int]:
    """One Ray Data pass: read every split's parquet, ``CacheWriter`` actors (one per GPU on a cluster) write
    the activations; only the rows' split names (and the actors' timings) come back. Returns rows per split."""
    import ray.data

    paths = []
    for s_ in splits:
        fs, p = storage.resolve(storage.join(data_dir, s_))
        paths.append(p)
    gpu = {"num_gpus": 1} if use_gpu else {}
    ds = storage.read_parquet(paths, fs, include_paths=True).map_batches(
        CacheWriter, fn_constructor_kwargs={"spec": spec, "weights_path": weights_path, "outputs": names,
                                            "out_dirs": out_dirs},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, batch_format="numpy",
        num_cpus=actor_cpus, **gpu)
    counts = dict.fromkeys(splits, 0)
    spent = {"init_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    t0, first = time.perf_counter(), None
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        first = first if first is not None else time.perf_counter() - t0
        found, n = np.unique(batch["split"], return_counts=True)
        for split, k in zip(found, n):
            counts[str(split)] += int(k)
        for k in spent:
            spent[k] += float(batch[k].sum())
    PROFILE.clear()
    PROFILE.update(where="actors", pass_s=time.perf_counter() - t0, first_batch_s=first or 0.0,
                   rows=sum(counts.values()), **{f"actor_{k}": v for k, v in spent.items()})
    log.info("cache: pass %.1f s (first batch after %.1f s) for %d rows; actor seconds: TF import + build "
             "%.1f, model %.1f, parquet writes %.1f", PROFILE["pass_s"], PROFILE["first_batch_s"],
             PROFILE["rows"], spent["init_s"], spent["model_s"], spent["write_s"])
    return counts


def _split_of(paths: np.ndarray) -> np.ndarray:
    """The split name from each row's file path (<data>/<split>/<file>.parquet)."""
    return np.array([p.rstrip("/").rsplit("/", 2)[-2] for p in paths.astype(str)])


def apply_model(data_dir: str, splits: list[str], spec: dict[str, Any], weights_path: str, outputs: list[str],
                *, actors: int = 1, batch_size: int = 256, use_gpu: bool = False, actor_cpus: float = 1.0) -> Any:
    """One Ray Data pass over ``splits``: a materialized dataset with out0.., label, id, split columns.

    One read over all the splits' folders (not a union of reads: fewer operators competing for CPUs).
    """
    import ray.data

    paths = []
    for s in splits:
        fs, p = storage.resolve(storage.join(data_dir, s))
        paths.append(p)
    ds = storage.read_parquet(paths, fs, include_paths=True)
    gpu = {"num_gpus": 1} if use_gpu else {}
    return ds.map_batches(
        ApplyModel, fn_constructor_kwargs={"spec": spec, "weights_path": weights_path, "outputs": outputs},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, batch_format="numpy",
        num_cpus=actor_cpus, **gpu,
    ).materialize()


def apply_model_numpy(data_dir: str, splits: list[str], spec: dict[str, Any], weights_path: str,
                      outputs: list[str], *, actors: int = 1, batch_size: int = 256, use_gpu: bool = False,
                      in_driver_max_rows: int = 0, actor_cpus: float = 1.0) -> dict[str, dict[str, np.ndarray]]:
    """A model's outputs on every split as arrays in id order: ``{split: {out0.., label, id}}`` (small outputs:
    probabilities, embeddings). The actor pool (``apply_model``), or, without GPUs, with one actor and at most
    ``in_driver_max_rows`` rows, the same ``ApplyModel`` in this process (no actor start-up)."""
    cols = [f"out{i}" for i in range(len(outputs))]
    if _driver_rows(data_dir, splits, actors=actors, use_gpu=use_gpu, max_rows=in_driver_max_rows) is None:
        ds = apply_model(data_dir, splits, spec, weights_path, outputs, actors=actors, batch_size=batch_size,
                         use_gpu=use_gpu, actor_cpus=actor_cpus)
        return {split: to_numpy(ds, split, cols) for split in splits}
    fn = ApplyModel(spec, weights_path, outputs)
    result = {}
    for split in splits:
        parts = list(_driver_batches(fn, data_dir, split, batch_size))
        result[split] = {c: np.concatenate([q[c] for q in parts]) if parts else np.zeros(0)
                         for c in [*cols, "label", "id"]}
    return result


def to_numpy(ds: Any, split: str, columns: list[str]) -> dict[str, np.ndarray]:
    """All rows of one split as numpy arrays, sorted by id (small outputs: predictions, embeddings)."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in [*columns, "label", "id"]}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=4096):
        mask = batch["split"] == split
        for c in parts:
            parts[c].append(batch[c][mask])
    out = {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}
    order = np.argsort(out["id"].astype(str), kind="stable")
    return {c: v[order] for c, v in out.items()}


def cache_key(spec: dict[str, Any], cut_layer: str, trunk_digest: str, data_fingerprint: str) -> str:
    """Content key: backbone, width, cut layer, input size, trunk weights, dataset version."""
    ident = {"backbone": spec["backbone"], "width": spec.get("width"), "input_size": spec["input_size"],
             "cut_layer": cut_layer, "trunk": trunk_digest, "data": data_fingerprint,
             "preprocess": spec["preprocess"]}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{spec['backbone']}-{cut_layer}-{spec['input_size']}-{digest}"


def trunk_digest(model: Any, cut_layer: str) -> str:
    """Hash of the weight values of every backbone layer up to and including the cut."""
    from transfuse.finetune import models

    net = models.get_backbone(model)
    h = hashlib.sha256()
    for layer in net.layers:
        for w in layer.get_weights():
            h.update(str(w.shape).encode())
            h.update(np.ascontiguousarray(w).tobytes())
        if layer.name == cut_layer:
            break
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    """An exclusive fcntl lock on a local file (no-op on object stores: their manifest marks completion)."""
    if storage.is_uri(path):
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_cache(cfg: Any, data_dir: str, spec: dict[str, Any], weights_path: str, cuts: dict[str, str],
                 *, splits: tuple[str, ...] = ("train", "val"), actors: int = 1, batch_size: int = 256,
                 use_gpu: bool = False, in_driver_max_rows: int = 0, actor_cpus: float = 1.0) -> dict[str, str]:
    """Make sure a cache exists for every ``{key: cut_layer}``; returns ``{cut_layer: cache_dir}``.

    Missing caches are computed in one Ray Data pass (all their cut points as outputs of one model): the
    ``CacheWriter`` actors write the parquet files themselves, the driver only counts rows per split. Without
    GPUs, with one actor asked for and at most ``in_driver_max_rows`` rows, the same model writes the same files
    from this process instead (the actor's start-up, a second TensorFlow import, was most of a small pass's time).
    """
    from transfuse.data import data_manifest

    root = CACHE.dir(cfg)
    data_fp = data_manifest(data_dir).get("fingerprint", "")
    dirs = {cut: storage.join(root, key) for key, cut in cuts.items()}
    lock_path = storage.join(root, ".lock")
    with _lock(lock_path):
        missing = {key: cut for key, cut in cuts.items() if not storage.is_complete(dirs[cut], data_fp)}
        if missing:
            names = list(missing.values())
            log.info("cache: computing %s over %s", names, splits)
            tmps = {key: storage.join(root, f".tmp-{key}-{uuid.uuid4().hex[:8]}") if not storage.is_uri(root)
                    else dirs[cut] for key, cut in missing.items()}
            rows = _driver_rows(data_dir, splits, actors=actors, use_gpu=use_gpu, max_rows=in_driver_max_rows)
            if rows is not None:
                counts = _compute_in_driver(data_dir, splits, spec, weights_path, names, list(tmps.values()),
                                            batch_size)
                log.info("cache: computed %d rows in the driver in %.1f s (model build %.1f, model %.1f, writes "
                         "%.1f)", rows, PROFILE["pass_s"], PROFILE["actor_init_s"], PROFILE["actor_model_s"],
                         PROFILE["actor_write_s"])
            else:
                counts = _compute_with_actors(data_dir, splits, spec, weights_path, names, list(tmps.values()),
                                              actors, batch_size, use_gpu, actor_cpus)
            for key, cut in missing.items():
                final, tmp = dirs[cut], tmps[key]
                storage.write_manifest(tmp, cfg, CACHE.folder, data_fp, cut_layer=cut, key=key, counts=counts,
                                       spec={k: spec[k] for k in ("backbone", "width", "input_size")})
                if tmp != final:
                    if os.path.exists(final):
                        shutil.rmtree(final)  # an incomplete leftover (no complete manifest)
                    os.rename(tmp, final)
        else:
            log.info("cache: reusing %s", list(cuts.values()))
    return dirs


def read_cache(cache_dir: str, split: str) -> Any:
    """The cached activations of one split: a Ray Dataset with x (float32 tensor), label, id."""
    fs, p = storage.resolve(storage.join(cache_dir, split))
    return storage.read_parquet(p, fs)


def read_cache_numpy(cache_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(activations float32 N x ..., labels int64) of one split, read with pyarrow in this process, id order."""
    import pyarrow.dataset as pads
    import ray.data  # noqa: F401  (registers Ray's Arrow tensor extension types)

    fs, p = storage.resolve(storage.join(cache_dir, split))
    table = pads.dataset(p, filesystem=fs, format="parquet").to_table().sort_by("id")
    col = table.column("x")
    x = np.concatenate([c.to_numpy() for c in col.chunks]) if col.num_chunks else np.zeros((0,), np.float32)
    return x.astype(np.float32, copy=False), table.column("label").to_numpy().astype(np.int64)


def cache_fingerprint(cache_dir: str) -> Optional[str]:
    m = storage.read_manifest(cache_dir)
    return m.get("key") if m else None
