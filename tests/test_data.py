"""The data layer on a local Ray: every source on small real data, splits, shards, bad input."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import smoke_config
from transfuse import storage
from transfuse.config import SPLITS
from transfuse.data import PREPARE, DataError, prepare, preprocessed, read_split, read_split_numpy
from transfuse.inference.preprocessing import PreprocessSpec

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _ids_by_split(data_dir: str) -> dict[str, set]:
    return {s: set(read_split_numpy(data_dir, s)[2]) for s in SPLITS}


def _data_dir(cfg) -> str:
    return PREPARE.dir(cfg)


# ---------------------------------------------------------------- digits: splits and shards


def test_digits_splits_disjoint_stratified_and_complete(digits_run):
    d = _data_dir(digits_run)
    m = storage.read_manifest(d)
    ids = _ids_by_split(d)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not ids[a] & ids[b], f"{a} and {b} share ids"
    assert sum(len(v) for v in ids.values()) == 1797  # every digit used once
    assert {s: len(ids[s]) for s in SPLITS} == m["totals"]
    for split in SPLITS:  # shard row counts add up, each shard at most rows_per_shard
        rows = [s["rows"] for s in m["shards"][split]]
        assert sum(rows) == m["totals"][split]
        assert max(rows) <= digits_run.data.rows_per_shard
    frac = {s: getattr(digits_run.data.split, s) for s in ("val", "test", "holdout")}
    for split, f in frac.items():  # stratified: each class gets its share (+-1 from rounding)
        for cls, n in m["counts"][split].items():
            n_cls = sum(m["counts"][s][cls] for s in SPLITS)
            assert abs(n - f * n_cls) <= 1, (split, cls, n, n_cls)
    images, labels, _ = read_split_numpy(d, "train")
    assert images.shape[1:] == (8, 8, 1) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert m["class_names"] == [str(i) for i in range(10)]


def test_manifest_checksums_and_config(digits_run):
    d = _data_dir(digits_run)
    m = storage.read_manifest(d)
    assert m["complete"] and m["config"]["run"] == digits_run.run
    assert m["versions"]["ray"] and "git_commit" in m
    assert m["files"] and all(storage.sha256(storage.join(d, f)) == h for f, h in m["files"].items())


def test_prepare_is_deterministic_and_skips_when_complete(digits_run, tmp_path):
    d = _data_dir(digits_run)
    before = storage.read_manifest(d)["created"]
    prepare(digits_run)  # complete for the same config: not rerun
    assert storage.read_manifest(d)["created"] == before
    again = smoke_config(tmp_path, "again")
    prepare(again)
    assert _ids_by_split(_data_dir(again)) == _ids_by_split(d)
    other = smoke_config(tmp_path, "seed1", ["seed=1"])
    prepare(other)
    assert _ids_by_split(_data_dir(other))["test"] != _ids_by_split(d)["test"]


def test_class_subset_and_label_caps(tmp_path):
    cfg = smoke_config(tmp_path, "subset", ["data.classes=[7, 3, 5]", "data.train_per_class=10",
                                            "data.train_fraction=0.5"])
    m = prepare(cfg)
    assert m["class_names"] == ["7", "3", "5"] and m["source_class_ids"] == [7, 3, 5]
    assert m["counts"]["train"] == {"0": 5, "1": 5, "2": 5}
    assert m["excluded"]["not_in_classes"] == 1797 - sum(
        sum(m["counts"][s].values()) for s in SPLITS) - m["excluded"]["train_cap"]
    images, labels, _ = read_split_numpy(_data_dir(cfg), "test")
    from sklearn.datasets import load_digits

    digits = load_digits()
    # relabelled: new label 0 is digit 7; its test images are real 7s
    sevens = {np.round(im * 255 / 16).astype(np.uint8).tobytes() for im in digits.images[digits.target == 7]}
    assert all(im[..., 0].tobytes() in sevens for im in images[labels == 0])


def test_streaming_preprocessing_on_ray_data(digits_run):
    ds = preprocessed(read_split(_data_dir(digits_run), "val"), PreprocessSpec(32, "unit"), batch_size=64)
    batch = ds.take_batch(16, batch_format="numpy")
    assert batch["x"].shape == (16, 32, 32, 3) and batch["x"].dtype == np.float32
    assert 0.0 <= batch["x"].min() and batch["x"].max() <= 1.0


def test_batch_augmentation_draws_only_from_the_callers_generator():
    """Augmentation in ``preprocess_batch`` needs the worker's seeded generator: the same draw for the same seed,
    and a clear error instead of an unseeded (unrepeatable) one."""
    from transfuse.config import AugmentConfig
    from transfuse.data.dataset import preprocess_batch

    rows = np.random.default_rng(0).integers(0, 256, (32, 12, 12, 1), dtype=np.uint8)
    batch = {"image": rows, "label": np.arange(32)}
    spec, aug = PreprocessSpec(12, "unit"), AugmentConfig(flip=True, pad_crop=2)
    with pytest.raises(ValueError, match="seeded generator"):
        preprocess_batch(batch, spec, aug)
    a, b, c = (preprocess_batch(batch, spec, aug, rng=np.random.default_rng(s))["x"] for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    plain = preprocess_batch(batch, spec, AugmentConfig(), rng=np.random.default_rng(1))  # nothing to draw
    np.testing.assert_array_equal(plain["x"], preprocess_batch(batch, spec)["x"])
    assert "id" not in plain and plain["label"].dtype == np.int64


# ---------------------------------------------------------------- Fashion-MNIST idx


def test_fashion_mnist_slice(fashion_dir, tmp_path):
    cfg = smoke_config(tmp_path, "fm", ["data.source=fashion_mnist", "data.classes=[1, 3]",
                                        "data.limit_per_class=100"])
    m = prepare(cfg)
    assert m["class_names"] == ["Trouser", "Dress"]
    assert sum(sum(c.values()) for c in m["counts"].values()) == 200
    assert m["image_shape"] == [28, 28, 1]
    assert m["source"]["path"] == str(fashion_dir)


def test_fashion_mnist_missing_folder_is_named(tmp_path):
    cfg = smoke_config(tmp_path, "fm2", ["data.source=fashion_mnist", f"data.path={tmp_path}/nowhere"])
    with pytest.raises(DataError, match="Fashion-MNIST file missing: .*nowhere/train-images-idx3-ubyte.gz"):
        prepare(cfg)


# ---------------------------------------------------------------- CIFAR-10 python batches


def _write_cifar(folder: Path, n: int = 12) -> np.ndarray:
    """Write cifar-10-batches-py in the real format (pickled dicts with bytes keys, protocol 2)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(x) for x in np.arange(n) % 10]
        if first is None:
            first = data
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)]}, f, protocol=2)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n, b"num_vis": 3072}, f, protocol=2)
    return first


def test_cifar10_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    first = _write_cifar(folder)
    cfg = smoke_config(tmp_path, "cifar", ["data.source=cifar10", f"data.path={folder}",
                                           "data.split={val: 0.1, test: 0.2, holdout: 0.1}"])
    m = prepare(cfg)
    assert m["class_names"][0] == "airplane" and m["image_shape"] == [32, 32, 3]
    assert sum(m["totals"].values()) == 72
    images, _, ids = (np.concatenate(x) for x in zip(*(read_split_numpy(_data_dir(cfg), s) for s in SPLITS)))
    k = list(ids).index("cifar10/data_batch_1/00003")
    # channel-first rows of 1024 become H x W x C
    np.testing.assert_array_equal(images[k], first[3].reshape(3, 32, 32).transpose(1, 2, 0))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_cifar10_malicious_pickle_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    cfg = smoke_config(tmp_path, "evil", ["data.source=cifar10", f"data.path={folder}"])
    with pytest.raises(DataError, match=r"data_batch_2: refused global (posix|os)\.system"):
        prepare(cfg)


# ---------------------------------------------------------------- image folders


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_folder(root: Path, per_class: int = 6, shape=(12, 12)) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "fox"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            (root / cls / f"{i}.png").write_bytes(_png(rng.integers(0, 256, size=shape, dtype=np.uint8)))


def _folder_cfg(tmp_path, root, run, *extra):
    return smoke_config(tmp_path, run, ["data.source=image_folder", f"data.path={root}",
                                        "data.split={val: 0.0, test: 0.34, holdout: 0.0}", *extra])


def test_image_folder_round_trip(tmp_path):
    root = tmp_path / "imgs"
    _write_folder(root)
    (root / "cat" / "notes.txt").write_text("not an image")
    grey12 = ["data.image_size=12", "data.channels=1"]  # the files' own size and mode: stored as they are
    m = prepare(_folder_cfg(tmp_path, root, "folder", *grey12))
    assert m["class_names"] == ["cat", "dog", "fox"]
    assert sum(m["totals"].values()) == 18 and m["image_shape"] == [12, 12, 1]
    assert m["ignored_files"]["count"] == 1 and m["ignored_files"]["files"][0]["path"].endswith("notes.txt")
    images, labels, ids = read_split_numpy(PREPARE.dir(_folder_cfg(tmp_path, root, "folder", *grey12)), "train")
    from PIL import Image

    k = 0
    with Image.open(root / ids[k]) as im:
        np.testing.assert_array_equal(images[k][..., 0], np.asarray(im))
    assert ids[k].split("/")[0] == ["cat", "dog", "fox"][labels[k]]


def test_image_folder_corrupt_file_error_and_skip(tmp_path):
    root = tmp_path / "imgs"
    _write_folder(root)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"(?s)1 bad example.*--set data.on_bad_file=skip.*dog/broken\.png: "
                                        r"unreadable image header"):
        prepare(_folder_cfg(tmp_path, root, "corrupt"))
    m = prepare(_folder_cfg(tmp_path, root, "skip", "data.on_bad_file=skip"))
    assert m["skipped"]["count"] == 1 and m["skipped"]["rows"][0]["id"] == "dog/broken.png"
    assert sum(m["totals"].values()) == 18


@pytest.mark.parametrize("setup, pattern", [
    ("empty_class", r"class folder 'fox' in .*/imgs holds no image files"),
    ("missing", r"image folder not found: .*/missing"),
    ("one_class", r"one subfolder per class \(at least 2\)"),
])
def test_image_folder_bad_layouts(tmp_path, setup, pattern):
    root = tmp_path / "imgs"
    if setup == "missing":
        root = tmp_path / "missing"
    elif setup == "one_class":
        (root / "only").mkdir(parents=True)
        (root / "only" / "a.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    else:
        _write_folder(root)
        if setup == "empty_class":
            for f in (root / "fox").iterdir():
                f.unlink()
    with pytest.raises(DataError, match=pattern):
        prepare(_folder_cfg(tmp_path, root, setup))


def test_a_separate_test_folder_is_the_test_split_whole(tmp_path):
    root, test = tmp_path / "imgs", tmp_path / "test"
    _write_folder(root)
    _write_folder(test, per_class=2)
    cfg = _folder_cfg(tmp_path, root, "sep", f"data.test_path={test}",
                      "data.split={val: 0.2, test: 0.0, holdout: 0.34}")
    m = prepare(cfg)
    assert m["totals"] == {"test": 6, "train": 9, "val": 3, "holdout": 6}
    _, _, ids = read_split_numpy(PREPARE.dir(cfg), "test")
    assert all(i.startswith("test:") for i in ids)
    for split in ("train", "val", "holdout"):
        assert not any(i.startswith("test:") for i in read_split_numpy(PREPARE.dir(cfg), split)[2])
    (test / "wolf").mkdir()
    (test / "wolf" / "0.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    with pytest.raises(DataError, match=r"test_path .* has classes \['wolf'\] that data.path .* lacks"):
        prepare(_folder_cfg(tmp_path, root, "sep2", f"data.test_path={test}", "data.split.test=0"))


def test_image_folder_of_mixed_sizes_is_resized_by_the_policy(tmp_path):
    root = tmp_path / "imgs"
    _write_folder(root)
    (root / "fox" / "0.png").write_bytes(_png(np.full((20, 50), 255, np.uint8)))  # wide, white
    cfg = _folder_cfg(tmp_path, root, "mixed", "data.image_size=10", "data.resize=pad")
    m = prepare(cfg)
    assert m["image_shape"] == [10, 10, 3] and m["image_policy"]["resize"] == "pad"
    images, _, ids = read_split_numpy(PREPARE.dir(cfg), "train")
    fox0 = list(ids).index("fox/0.png") if "fox/0.png" in ids else None
    if fox0 is None:  # the split put it in test
        images, _, ids = read_split_numpy(PREPARE.dir(cfg), "test")
        fox0 = list(ids).index("fox/0.png")
    # 50 x 20 -> 10 x 4, padded above and below: the whole photo, undistorted
    assert (images[fox0][3:7] == 255).all() and (images[fox0][:3] == 0).all() and (images[fox0][7:] == 0).all()


# ---------------------------------------------------------------- parquet


def test_parquet_round_trip(digits_run, tmp_path):
    src = _data_dir(digits_run)
    cfg = smoke_config(tmp_path, "pq", ["data.source=parquet", f"data.path={src}/train"])
    m = prepare(cfg)
    assert sum(m["totals"].values()) == storage.read_manifest(src)["totals"]["train"]
    a_img, a_lbl, a_ids = read_split_numpy(src, "train")
    parts = [read_split_numpy(_data_dir(cfg), s) for s in SPLITS]
    order = np.argsort(np.concatenate([p[2] for p in parts]))
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts])[order], a_img)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts])[order], a_lbl)


def test_parquet_label_outside_class_list(digits_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    folder = tmp_path / "pq"
    folder.mkdir()
    images = np.zeros((6, 4, 4, 1), np.uint8)
    table = pa.table({"image": ArrowTensorArray.from_numpy(images), "label": pa.array([0, 1, 0, 1, 0, 7]),
                      "id": pa.array([f"r{i}" for i in range(6)])})
    pq.write_table(table, folder / "part-0.parquet")
    (folder / "manifest.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    cfg = smoke_config(tmp_path, "pqbad", ["data.source=parquet", f"data.path={folder}"])
    with pytest.raises(DataError, match=r"r5: label 7 outside the class list 0\.\.1 \['a', 'b'\]"):
        prepare(cfg)
    table = table.drop_columns(["id"])
    pq.write_table(table, folder / "part-0.parquet")
    with pytest.raises(DataError, match=r"lacks columns \['id'\]"):
        prepare(smoke_config(tmp_path, "pqcols", ["data.source=parquet", f"data.path={folder}"]))
