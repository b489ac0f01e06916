"""Frozen layers computed once: activations at the cut point, cached as parquet and shared between runs.

Training a head on a frozen base recomputes the whole base every epoch in the naive recipe. Here the
activations at the cut point (output of the last frozen layer) are computed once with Ray Data
``map_batches`` on an actor pool (one actor per GPU on a cluster) and stored under
``<storage>/<run>/cache/<key>/{train,val}/`` with a manifest. The key hashes the backbone, width, cut layer,
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
import uuid
from typing import Any, Iterator, Optional

import numpy as np

from transfuse import storage
from transfuse.preprocess import PreprocessSpec, preprocess

log = logging.getLogger(__name__)

CACHE_STAGE = "cache"


class ApplyModel:
    """Ray Data actor: canonical rows (image, label, id) -> chosen model outputs, one column per output.

    ``outputs`` names backbone layers (activations at a cut point) or the special "probs" and "embedding".
    The model is rebuilt from its spec and a full-model weights file (no code loaded from files).
    """

    def __init__(self, spec: dict[str, Any], weights_path: str, outputs: list[str]) -> None:
        from transfuse import runtime  # noqa: F401  (tf_keras in this actor)
        import tensorflow as tf

        from transfuse import models

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
        self._fn = tf.keras.Model(model.input, tensors)
        self._outputs = outputs
        self._spec = PreprocessSpec(**spec["preprocess"])

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = np.stack(list(batch["image"])) if batch["image"].dtype == object else batch["image"]
        x = preprocess(images, self._spec)
        outs = self._fn(x, training=False)
        if len(self._outputs) == 1:
            outs = [outs]
        result = {f"out{i}": np.asarray(o, dtype=np.float32) for i, o in enumerate(outs)}
        result["label"] = np.asarray(batch["label"], dtype=np.int64)
        result["id"] = np.asarray(batch["id"])
        if "path" in batch:
            result["split"] = _split_of(np.asarray(batch["path"]))
        return result


def _split_of(paths: np.ndarray) -> np.ndarray:
    """The split name from each row's file path (<data>/<split>/<file>.parquet)."""
    return np.array([p.rstrip("/").rsplit("/", 2)[-2] for p in paths.astype(str)])


def apply_model(data_dir: str, splits: list[str], spec: dict[str, Any], weights_path: str, outputs: list[str],
                *, actors: int = 1, batch_size: int = 256, use_gpu: bool = False) -> Any:
    """One Ray Data pass over ``splits``: a materialized dataset with out0.., label, id, split columns.

    One read over all the splits' folders (not a union of reads: fewer operators competing for CPUs).
    """
    import ray.data

    paths = []
    for s in splits:
        fs, p = storage.resolve(storage.join(data_dir, s))
        paths.append(p)
    ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True)
    gpu = {"num_gpus": 1} if use_gpu else {}
    return ds.map_batches(
        ApplyModel, fn_constructor_kwargs={"spec": spec, "weights_path": weights_path, "outputs": outputs},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, batch_format="numpy", **gpu,
    ).materialize()


def select(ds: Any, split: str, columns: dict[str, str]) -> Any:
    """Rows of one split, with columns renamed (``{"out0": "x"}``); label and id kept."""
    def pick(batch: dict[str, Any]) -> dict[str, Any]:
        mask = batch["split"] == split
        out = {new: batch[old][mask] for old, new in columns.items()}
        out["label"] = batch["label"][mask]
        out["id"] = batch["id"][mask]
        return out

    return ds.map_batches(pick, batch_format="numpy")


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
    from transfuse import models

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
                 use_gpu: bool = False) -> dict[str, str]:
    """Make sure a cache exists for every ``{key: cut_layer}``; returns ``{cut_layer: cache_dir}``.

    Missing caches are computed in one Ray Data pass (all their cut points as outputs of one model).
    """
    from transfuse.data import data_manifest

    root = storage.stage_dir(cfg, CACHE_STAGE)
    data_fp = data_manifest(data_dir).get("fingerprint", "")
    dirs = {cut: storage.join(root, key) for key, cut in cuts.items()}
    lock_path = storage.join(root, ".lock")
    with _lock(lock_path):
        missing = {key: cut for key, cut in cuts.items() if not storage.is_complete(dirs[cut], data_fp)}
        if missing:
            names = list(missing.values())
            log.info("cache: computing %s over %s", names, splits)
            ds = apply_model(data_dir, list(splits), spec, weights_path, names, actors=actors,
                             batch_size=batch_size, use_gpu=use_gpu)
            counts = dict.fromkeys(splits, 0)
            for batch in ds.iter_batches(batch_format="numpy", batch_size=4096):
                for split in splits:
                    counts[split] += int(np.sum(batch["split"] == split))
            for i, (key, cut) in enumerate(missing.items()):
                final = dirs[cut]
                tmp = storage.join(root, f".tmp-{key}-{uuid.uuid4().hex[:8]}") if not storage.is_uri(root) else final
                for split in splits:
                    part = select(ds, split, {f"out{i}": "x"})
                    fs, p = storage.resolve(storage.join(tmp, split))
                    part.write_parquet(p, filesystem=fs)
                storage.write_manifest(tmp, cfg, CACHE_STAGE, data_fp, cut_layer=cut, key=key, counts=counts,
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
    import ray.data

    fs, p = storage.resolve(storage.join(cache_dir, split))
    return ray.data.read_parquet(p, filesystem=fs)


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
