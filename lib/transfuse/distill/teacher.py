"""The distill stage's views and its teacher (Ray Data): every image of the unlabelled pool and of the labelled
train split in ``distill.views`` views, the first as is and the others augmented (seeded by the image's id and the
view), each labelled by the stacked ensemble (``TeacherActor``) with its probabilities and the student's loss
target. See ``transfuse.distill.stage``.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from transfuse import storage
from transfuse.config import UNLABELLED, Config
from transfuse.data import PREPARE
from transfuse.errors import TransfuseError

PROB_FLOOR = 1e-12  # probabilities are clipped here before their log (soften, the served temperature stacker)


class DistillError(TransfuseError, RuntimeError):
    """The distill stage cannot run (no unlabelled pool, a label column in it, no ensemble to learn from)."""


def batch_images(batch: dict[str, Any]) -> np.ndarray:
    """A batch's ``image`` column as one array (stacked where it comes as an object array of per-row arrays)."""
    img = batch["image"]
    return np.stack(list(img)) if img.dtype == object else np.asarray(img)


def _unlabelled_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """An unlabelled row in the labelled rows' schema: label -1 (no label: only the teacher's targets)."""
    return {"image": batch_images(batch), "label": np.full(len(batch["id"]), -1, np.int64),
            "id": np.asarray(batch["id"], dtype=object)}


def augment_view(batch: dict[str, Any], view: int, seed: int, flip: bool, pad_crop: int) -> dict[str, Any]:
    """View ``view`` of each image: view 0 as is, the others augmented with a generator seeded by (seed, view,
    the image's id), so a view does not depend on how Ray Data batched the rows."""
    from transfuse.inference import augment

    images = batch_images(batch)
    ids = np.asarray(batch["id"], dtype=object)
    if view > 0 and (flip or pad_crop):
        images = np.stack([augment(images[i:i + 1], np.random.default_rng([seed, view, zlib.crc32(str(ids[i])
                                                                                                   .encode())]),
                                   flip, pad_crop)[0] for i in range(len(ids))]).astype(images.dtype)
    return {"image": images, "label": np.asarray(batch["label"], np.int64), "id": ids,
            "view": np.full(len(ids), view, np.int64)}


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: the teacher's probabilities at temperature T (the argmax does not move)."""
    from transfuse.inference import softmax

    return softmax(np.log(np.clip(np.asarray(probs, np.float64), PROB_FLOOR, 1.0)) / temperature)


class TeacherActor:
    """A Ray Data actor: the stacked ensemble (float32 Keras members, ONNX scikit-learn members, the stacker) on
    a batch of views. Adds ``teacher`` (its probabilities) and ``target``: [teacher at T (K), one-hot label or
    zeros (K), labelled flag (1)], what the student's loss reads."""

    def __init__(self, members: list[tuple[str, str]], parts: Any, temperature: float, num_classes: int,
                 batch_size: int):
        from transfuse import finetune
        from transfuse.ensemble import keras_baseline
        from transfuse.finetune import KerasMember
        from transfuse.inference import PreprocessSpec

        loaded = [KerasMember(name, *finetune.load_member(d)) for name, d in members]
        self.ensemble = keras_baseline(loaded, parts, PreprocessSpec(**loaded[0].spec["preprocess"]))
        self.t, self.k, self.rows = temperature, num_classes, int(batch_size)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The ensemble's probabilities in chunks of exactly ``batch_size`` rows (the last one padded with zeros):
        Ray Data cuts batches where its blocks happen to arrive, and TensorFlow's kernels for a batch of one image
        round differently (1e-7) from a batch of many; under Adam such differences in the targets grow into a
        different student. In fixed-shape chunks a view's probabilities do not depend on its batch mates."""
        out = [np.zeros((0, self.k), np.float32)]  # (an empty block's batch has no rows to predict)
        for i in range(0, len(images), self.rows):
            part = images[i:i + self.rows]
            n = len(part)
            if n < self.rows:
                part = np.concatenate([part, np.zeros((self.rows - n, *part.shape[1:]), part.dtype)])
            out.append(self.ensemble(part)[:n])
        return np.concatenate(out)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = batch_images(batch)
        probs = self.predict(images)
        labels = np.asarray(batch["label"], np.int64)
        labelled = labels >= 0
        onehot = np.eye(self.k, dtype=np.float32)[np.where(labelled, labels, 0)] * labelled[:, None]
        target = np.concatenate([soften(probs, self.t), onehot, labelled[:, None]], axis=1).astype(np.float32)
        return {"image": images, "target": target, "teacher": probs.astype(np.float32), "label": labels,
                "id": np.asarray(batch["id"], dtype=object), "view": np.asarray(batch["view"], np.int64)}


def read_pool(data_dir: str) -> Any:
    """The unlabelled split as a Ray Dataset; a DistillError if it is absent or carries a label column."""
    from transfuse.data import read_split

    path = storage.join(data_dir, UNLABELLED)
    if not storage.exists(path):
        raise DistillError(f"no unlabelled split in {data_dir}: set data.unlabelled_per_class (with "
                           "data.labelled_per_class) and rerun the prepare stage")
    ds = read_split(data_dir, UNLABELLED)
    names = ds.schema().names
    if "label" in names:
        raise DistillError(f"{path} has a label column (columns {names}): the distill stage learns from the "
                           "teacher on unlabelled images and must never read their labels")
    return ds


def teacher_views(cfg: Config, members: list[tuple[str, str]], parts: Any, num_classes: int) -> Any:
    """Every view of the unlabelled pool and the labelled train split, labelled by the teacher, materialized."""
    import ray.data

    from transfuse.data import read_split

    d = cfg.distill
    data_dir = PREPARE.dir(cfg)
    base = read_pool(data_dir).map_batches(_unlabelled_rows, batch_format="numpy").union(
        read_split(data_dir, "train"))
    views = [base.map_batches(augment_view, fn_kwargs={"view": v, "seed": cfg.seed, "flip": d.augment.flip,
                                                       "pad_crop": d.augment.pad_crop}, batch_format="numpy")
             for v in range(d.views)]
    ds = views[0].union(*views[1:]) if len(views) > 1 else views[0]
    gpu = {"num_gpus": 1} if cfg.train.use_gpu else {"num_cpus": 1}
    return ds.map_batches(TeacherActor, fn_constructor_kwargs={"members": members, "parts": parts,
                                                              "temperature": d.temperature,
                                                              "num_classes": num_classes,
                                                              "batch_size": d.teacher_batch_size},
                          compute=ray.data.ActorPoolStrategy(size=d.teacher_actors),
                          batch_size=d.teacher_batch_size, batch_format="numpy", **gpu).materialize()
