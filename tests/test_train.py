"""Fine-tuning on Ray Train with two workers on the local Ray cluster (digits, vgg_small width 0.125).

One run serves several checks (it is the slow part): a worker is SIGKILLed once mid-run and the run still
finishes with the right epochs; loss falls; checkpoints, metrics, predictions, embeddings and the manifest are
written; the member reloads. A second call resumes that run with one more epoch.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from transfuse import environment  # noqa: F401
from transfuse import storage
from transfuse.data import PREPARE

pytest.importorskip("tensorflow")

OVERRIDES = {"epochs_frozen": 2, "epochs_unfrozen": 1, "unfreeze": 4}  # independent of smoke.yaml


def _cfg(digits_run):
    # two Ray Train workers, 1 logical CPU each; a bit higher phase-1 rate so 2 tiny epochs show a falling loss
    data = digits_run.model_dump(mode="json")
    data["train"].update(num_workers=2, cpus_per_worker=1, max_failures=1, lr_frozen=3e-3, batch_size=64)
    return type(digits_run).model_validate(data)


@pytest.fixture(scope="module")
def finetuned(digits_run, tmp_path_factory):
    from transfuse.finetune.stage import finetune

    cfg = _cfg(digits_run)
    out = str(tmp_path_factory.mktemp("member"))
    marker = str(tmp_path_factory.mktemp("kill") / "killed")
    # rank 1 kills itself once (SIGKILL) right after global epoch 1 was checkpointed
    metrics = finetune(cfg, out, OVERRIDES, force=True,
                       test_hooks={"kill_at_epoch": {"epoch": 1, "rank": 1, "marker": marker}})
    return cfg, out, metrics, marker


def test_killed_worker_run_finishes_with_the_right_epochs(finetuned):
    _, out, metrics, marker = finetuned
    import os

    assert os.path.exists(marker), "the worker was not killed: the test hook did not fire"
    hist = metrics["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert [h["phase"] for h in hist] == ["frozen", "frozen", "unfrozen"]


def test_loss_falls_and_outputs_are_written(finetuned):
    from transfuse.finetune.loop import CKPT_WEIGHTS

    _, out, metrics, _ = finetuned
    hist = metrics["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    for split in ("val", "test", "holdout"):
        m = metrics[split]
        assert set(m) >= {"accuracy", "nll", "ece", "n"} and m["n"] > 0
        t = pq.read_table(storage.join(out, "predictions", f"{split}.parquet"))
        assert t.num_rows == m["n"] and t.column_names == ["id", "label", "probs"]
        probs = np.stack(t.column("probs").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-4)
    for split in ("train", "val", "test", "holdout"):
        t = pq.read_table(storage.join(out, "embeddings", f"{split}.parquet"))
        assert t.num_rows > 0 and len(t.column("embedding")[0]) == 64  # smoke head: Dense(64)
    ckpts = [f for f in storage.list_files(storage.join(out, ".ray_train")) if f.startswith("checkpoint_")]
    assert any(f.endswith(CKPT_WEIGHTS) for f in ckpts)
    m = storage.read_manifest(out)
    assert m["complete"] and "model.weights.h5" in m["files"] and "metrics.json" in m["files"]
    spec = storage.read_json(storage.join(out, "model_spec.json"))
    assert spec["cut_layer"] == "block4_pool" and spec["unfreeze"] == 4 and len(spec["backbone_layers"]) == 18


def test_member_reloads_with_the_same_predictions(finetuned, digits_run):
    from transfuse.data import read_split_numpy
    from transfuse.finetune.models import load_member
    from transfuse.inference.preprocessing import PreprocessSpec, preprocess

    _, out, _, _ = finetuned
    model, spec = load_member(out)
    images, labels, ids = read_split_numpy(PREPARE.dir(digits_run), "test")
    probs = model.predict(preprocess(images, PreprocessSpec(**spec["preprocess"])), verbose=0)
    t = pq.read_table(storage.join(out, "predictions", "test.parquet"))
    assert list(t.column("id").to_pylist()) == list(ids)
    np.testing.assert_allclose(np.stack(t.column("probs").to_numpy(zero_copy_only=False)), probs, atol=1e-5)


def test_checkpoint_weights_round_trip_and_read_older_h5_checkpoints(tmp_path):
    import tensorflow as tf

    from transfuse.finetune.loop import (CKPT_WEIGHTS, LEGACY_CKPT_WEIGHTS, load_checkpoint_weights,
                                         save_checkpoint_weights)

    def model(seed):
        tf.keras.utils.set_random_seed(seed)
        layers = tf.keras.layers
        return tf.keras.Sequential([tf.keras.Input((6,)), layers.Dense(4), layers.BatchNormalization(),
                                    layers.Dense(3)])

    a, b, c = model(0), model(1), model(2)
    assert not np.allclose(a.get_weights()[0], b.get_weights()[0])
    save_checkpoint_weights(a, str(tmp_path))
    assert (tmp_path / CKPT_WEIGHTS).exists()
    load_checkpoint_weights(b, str(tmp_path))
    for x, y in zip(a.get_weights(), b.get_weights()):  # every array, BatchNorm's moving statistics included
        np.testing.assert_array_equal(x, y)
    old = tmp_path / "old"
    old.mkdir()
    a.save_weights(str(old / LEGACY_CKPT_WEIGHTS))  # a checkpoint written before the .npz format
    load_checkpoint_weights(c, str(old))
    for x, y in zip(a.get_weights(), c.get_weights()):
        np.testing.assert_array_equal(x, y)


def _optimizer_step(out) -> int:
    """Adam's step counter in the newest checkpoint of the member dir's Ray Train run."""
    from transfuse.finetune.stage import latest_checkpoint
    from transfuse.finetune.loop import read_optimizer_state

    with latest_checkpoint(out).as_directory() as d:
        return int(read_optimizer_state(d)[0])  # the optimizer's first variable is its iteration count


def test_resume_continues_from_the_last_checkpoint(finetuned):
    from transfuse.finetune.stage import finetune

    cfg, out, first, _ = finetuned
    steps = _optimizer_step(out)  # after the one unfrozen epoch
    assert steps > 0
    more = dict(OVERRIDES, epochs_unfrozen=2)
    metrics = finetune(cfg, out, more, resume=True)
    hist = metrics["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]  # only epoch 4 ran
    assert hist[:3] == first["history"]
    # the resumed phase went on with the checkpointed Adam state: its step count doubled (a fresh optimizer
    # would be back at one epoch's steps)
    assert _optimizer_step(out) == 2 * steps


def test_bad_overrides_are_refused(digits_run):
    from transfuse.finetune.stage import TrainError, effective

    with pytest.raises(TrainError, match="unknown overrides"):
        effective(digits_run, {"learning_rate": 1.0})


def test_overrides_and_scratch_budget(digits_run):
    from transfuse.finetune.stage import effective, mixed_policy, scratch_overrides

    eff = effective(digits_run, {"unfreeze": 8, "head_dense": 32, "dropout": 0.3, "lr_frozen": 0.01, "seed": 3})
    assert (eff.model.unfreeze, eff.model.head.dense, eff.model.head.dropout) == (8, [32], 0.3)
    assert (eff.train.lr_frozen, eff.train.seed) == (0.01, 3)
    s = scratch_overrides(digits_run)
    assert s["unfreeze"] == 18 and s["epochs_frozen"] == 0
    epochs = digits_run.train.epochs_frozen + digits_run.train.epochs_unfrozen
    # from scratch, early stopping counts only in the second half (the val loss rises before it falls)
    assert s["epochs_unfrozen"] == epochs and s["early_stopping_start"] == epochs // 2
    assert s["lr_unfrozen"] == digits_run.train.lr_frozen
    assert effective(digits_run, s).train.early_stopping_start == epochs // 2
    assert mixed_policy("auto", True) == "mixed_float16" and mixed_policy("auto", False) == "float32"
    # block units: the scratch net trains every block; the searched depth may count blocks where the seed's
    # depth counts layers; a head width of 0 means no hidden layer
    lite = effective(digits_run.model_copy(update={"model": digits_run.model.model_copy(update={
        "backbone": "efficientnet_lite0", "input_size": 32, "unfreeze_unit": "blocks", "weights": "none"})}))
    assert scratch_overrides(lite)["unfreeze"] == 18  # stem, 16 MBConv blocks, head
    eff = effective(lite, {"unfreeze": 2, "unfreeze_unit": "blocks", "head_dense": 0})
    assert eff.model.unfreeze_unit == "blocks" and eff.model.head.dense == []
    lr = digits_run.model_copy(update={"train": digits_run.train.model_copy(update={"lr_scratch": 1e-4})})
    assert scratch_overrides(lr)["lr_unfrozen"] == 1e-4


def _shifted_train_labels(digits_run, dest) -> str:
    """A copy of the prepared digits whose TRAIN labels are shifted by one class ((y + 1) mod 10); val, test and
    holdout keep the true labels. The more the model learns, the worse its validation loss: a run whose best
    epoch by val loss is its first and whose last is clearly worse, whatever the learning rate's noise."""
    import json
    import shutil

    import pyarrow as pa

    src = PREPARE.dir(digits_run)
    dst = str(dest / "data")
    shutil.copytree(src, dst)
    for f in sorted((dest / "data" / "train").glob("*.parquet")):
        t = pq.read_table(f)
        i = t.column_names.index("label")
        shifted = pa.array((t.column("label").to_numpy() + 1) % 10, pa.int64())
        pq.write_table(t.set_column(i, "label", shifted), f)
    man = json.loads((dest / "data" / "manifest.json").read_text())
    man["fingerprint"] = man.get("fingerprint", "") + "-shifted"  # its own cache key
    (dest / "data" / "manifest.json").write_text(json.dumps(man))
    return dst


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "full"])
def test_phase_ends_with_its_best_epoch(digits_run, tmp_path, cached):
    """A phase whose validation loss gets worse after its best epoch ends with that epoch's weights, on every
    worker: the saved member's val NLL is the history's minimum, not the last epoch's. Both the cached path
    (head on cached activations, two workers) and the full model (images, one worker).
    """
    from transfuse.finetune.stage import finetune

    data = _cfg(digits_run).model_dump(mode="json")
    data["storage"] = str(tmp_path / "runs")
    data["train"].update(lr_frozen=0.02, early_stopping_patience=10, cache_frozen=cached,
                         num_workers=2 if cached else 1)
    cfg = type(digits_run).model_validate(data)
    data_dir = _shifted_train_labels(digits_run, tmp_path)
    digests = tmp_path / "digests"
    digests.mkdir()
    out = str(tmp_path / "member")
    metrics = finetune(cfg, out, {"epochs_frozen": 4, "epochs_unfrozen": 0, "unfreeze": 4}, force=True,
                       data_dir=data_dir, test_hooks={"weights_digest": {"dir": str(digests)}})
    hist = metrics["history"]
    val = [h["val_loss"] for h in hist]
    best = int(np.argmin(val))
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert best < len(val) - 1 and val[-1] > val[best] + 0.02, f"val loss did not get worse: {val}"
    # the saved model's val NLL (recomputed from its weights by finalize) is the best epoch's val loss
    assert metrics["val"]["nll"] == pytest.approx(val[best], abs=5e-3)
    assert metrics["val"]["nll"] < val[-1] - 0.015
    assert metrics["restored"] == [{"phase": "frozen", "best_epoch": best + 1, "last_epoch": 4,
                                    "val_loss": pytest.approx(val[best])}]
    # every worker holds the same weights after the restore, and they are the saved member's
    from transfuse.finetune.models import load_member, weights_digest

    final = sorted(digests.glob("epoch4-rank*.txt"))
    assert len(final) == cfg.train.num_workers
    assert {f.read_text() for f in final} == {weights_digest(load_member(out)[0])}


def test_early_stopping_monitors_only_after_its_start(digits_run, tmp_path):
    """Patience 1 from epoch 3 (Keras's start_from_epoch) on a run whose val loss gets worse: epochs 1-3 always run
    and are not monitored, so the phase stops at the first epoch after 4 that does not beat epochs 4.. and keeps
    the best of those, even though an unmonitored epoch had a lower val loss."""
    from transfuse.finetune.stage import finetune

    data = _cfg(digits_run).model_dump(mode="json")
    data["storage"] = str(tmp_path / "runs")
    data["train"].update(lr_frozen=0.02, early_stopping_patience=1, early_stopping_start=3, num_workers=1)
    cfg = type(digits_run).model_validate(data)
    metrics = finetune(cfg, str(tmp_path / "member"), {"epochs_frozen": 8, "epochs_unfrozen": 0, "unfreeze": 4},
                       force=True, data_dir=_shifted_train_labels(digits_run, tmp_path))
    val = [h["val_loss"] for h in metrics["history"]]
    assert len(val) >= 5, val  # epochs 1-3 unmonitored and epoch 4 the first best: none of them can stop it
    stop = next(e for e in range(5, 9) if e == 8 or val[e - 1] >= min(val[3:e - 1]) - 1e-6)
    assert len(val) == stop, val
    assert any(val[e] >= min(val[:e]) - 1e-6 for e in range(1, 3)), val  # unmonitored, one of them would stop it
    assert min(val[:3]) < min(val[3:]), val  # and the lowest val loss is an unmonitored epoch's
    best = 4 + int(np.argmin(val[3:]))
    assert [r["best_epoch"] for r in metrics["restored"]] == ([best] if best != len(val) else []), metrics["restored"]
    assert metrics["val"]["nll"] == pytest.approx(val[best - 1], rel=1e-3)  # the saved member is that epoch


def test_same_config_and_seed_give_the_same_member(digits_run, tmp_path):
    """op_determinism + seeded shuffles: two runs of one config train the same weights, bit for bit (the default
    config's fine-tune stage gave identical test metrics on two runs, 0.9085 / NLL 0.373687308478)."""
    from transfuse.finetune import models
    from transfuse.finetune.stage import finetune

    cfg = digits_run.model_copy(update={"train": digits_run.train.model_copy(update={"op_determinism": True})})
    overrides = {"epochs_frozen": 1, "epochs_unfrozen": 1, "unfreeze": 4}
    runs = [finetune(cfg, str(tmp_path / f"run{i}"), overrides, force=True) for i in range(2)]
    digests = [models.weights_digest(models.load_member(str(tmp_path / f"run{i}"))[0]) for i in range(2)]
    assert digests[0] == digests[1]
    assert runs[0]["test"] == runs[1]["test"]
    assert runs[0]["history"] == runs[1]["history"]


def test_streamed_rows_are_preprocessed_and_augmented_by_the_worker(digits_run):
    """The streamed path's dataset holds the stored uint8 rows; the worker's tf.data pipeline preprocesses each
    batch with the one function: every row once, the same values as preprocessing the split in memory; with
    flip augmentation each row is itself or its mirror, the draw repeats for the same (seed, rank, epoch) and
    changes with the epoch."""
    from transfuse.config import AugmentConfig
    from transfuse.data import read_split_numpy, training_rows
    from transfuse.inference.preprocessing import PreprocessSpec, preprocess
    from transfuse.finetune.loop import tf_dataset

    data_dir = PREPARE.dir(digits_run)
    rows = training_rows(data_dir, "val")
    assert rows.schema().names == ["image", "label"]
    assert "uint8" in str(rows.schema().types[0])
    rows = rows.materialize()  # read once: the passes below differ only in the worker's preprocessing
    spec = PreprocessSpec(32, "unit")
    images, labels, _ = read_split_numpy(data_dir, "val")
    expected = preprocess(images, spec)

    def one_pass(augment=None, epoch=0, rank=0):
        batches = list(tf_dataset(rows, 16, False, 7, False, lambda: epoch, images=spec, augment=augment, rank=rank))
        return np.concatenate([b[0].numpy() for b in batches]), np.concatenate([b[1].numpy() for b in batches])

    def by_content(x, y):
        order = np.lexsort((x.reshape(len(x), -1).sum(1), y))
        return x[order], y[order]

    x, y = one_pass()
    assert x.dtype == np.float32 and x.shape == expected.shape and y.dtype == np.int64
    for got, want in zip(by_content(x, y), by_content(expected, labels)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    flip = AugmentConfig(flip=True)
    x0, y0 = one_pass(flip, epoch=0)
    (xp, yp), (x0b, _), (x1, _), (xr, _) = one_pass(), one_pass(flip, 0), one_pass(flip, 1), one_pass(flip, 0, 1)
    np.testing.assert_array_equal(y0, yp)  # one block, one order: row i is the same image in every pass
    mirrored = np.all(np.isclose(x0, xp[:, :, ::-1]), axis=(1, 2, 3))
    kept = np.all(np.isclose(x0, xp), axis=(1, 2, 3))
    assert np.all(mirrored | kept)
    flipped = mirrored & ~kept  # symmetric images look the same either way
    assert 0.3 < flipped.mean() < 0.7, flipped.mean()
    np.testing.assert_array_equal(x0, x0b)
    assert not np.array_equal(x0, x1) and not np.array_equal(x0, xr)


def test_streamed_rows_with_augmentation_train(digits_run, tmp_path):
    """``train.materialize=false`` with flip augmentation: both phases read the stored rows and the worker
    preprocesses them; the run goes through both phases and its training loss falls."""
    from transfuse.finetune.stage import build_trainer, finetune

    data = _cfg(digits_run).model_dump(mode="json")
    data["train"].update(materialize=False, augment={"flip": True}, cache_frozen=False, num_workers=1, lr_frozen=0.01)
    cfg = type(digits_run).model_validate(data)
    _, inputs, _ = build_trainer(cfg, str(tmp_path / "plan"), OVERRIDES)
    assert all(p.images for p in inputs.phases) and not inputs.in_memory
    assert all(ds.schema().names == ["image", "label"] for ds in inputs.datasets.values())
    hist = finetune(cfg, str(tmp_path / "member"), OVERRIDES, force=True)["history"]
    assert [h["phase"] for h in hist] == ["frozen", "frozen", "unfrozen"]
    assert hist[1]["loss"] < hist[0]["loss"]  # measured: 2.325 -> 2.304 (the smoke model learns slowly)


# ----------------------------------------------------------------------------------------------------------------
# Class weights (data.class_weight; the rule and the math: test_class_weights.py)


def test_metrics_record_the_class_weighting_and_per_class_scores(finetuned):
    """The balanced digits leave ``auto`` off: metrics.json and the manifest say so with the train imbalance; each
    split's metrics carry balanced accuracy, macro F1 and recall by class name, scikit-learn's on the saved
    predictions."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    _, out, _, _ = finetuned
    metrics = storage.read_json(storage.join(out, "metrics.json"))  # the files on disk (a resumed run rewrote them)
    cw = metrics["class_weight"]
    assert cw["mode"] == "auto" and cw["on"] is False and cw["train_imbalance"] < 2.0 and "weights" not in cw
    assert storage.read_manifest(out)["class_weight"] == cw
    names = storage.read_json(storage.join(out, "model_spec.json"))["class_names"]
    t = pq.read_table(storage.join(out, "predictions", "test.parquet"))
    y, pred = t.column("label").to_numpy(), np.stack(t.column("probs").to_numpy(zero_copy_only=False)).argmax(1)
    m = metrics["test"]
    assert list(m["per_class_recall"]) == names
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-9)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-9)


def test_the_decision_reaches_the_training_loop(digits_run, tmp_path):
    """``data.class_weight: balanced`` gives the workers' loop the train split's class weights in class order (what
    train_func hands Keras as class_weight); ``none`` gives them none."""
    from transfuse.class_weights import class_weights
    from transfuse.data import read_split_numpy
    from transfuse.finetune.stage import build_trainer

    _, train_labels, _ = read_split_numpy(PREPARE.dir(digits_run), "train")
    loops = {}
    for mode in ("balanced", "none"):
        data = digits_run.model_dump(mode="json")
        data["data"]["class_weight"] = mode
        data["train"]["cache_frozen"] = False  # nothing to cache for this check
        cfg = type(digits_run).model_validate(data)
        trainer, inputs, _ = build_trainer(cfg, str(tmp_path / mode), OVERRIDES)
        loops[mode] = trainer.train_loop_config["loop"]
        assert inputs.class_weight["on"] is (mode == "balanced")
    np.testing.assert_allclose(loops["balanced"].class_weights, class_weights(train_labels, 10), rtol=1e-12)
    assert loops["none"].class_weights is None


def test_class_weighted_loss_raises_minority_recall_in_the_workers_pipeline(digits_run):
    """The worker's input pipeline (``tf_dataset`` over an in-memory Ray Dataset, as a Train worker reads its shard)
    and Keras's loss compiled as train_func compiles it, fitted with and without ``keras_class_weight`` of the
    train labels' class weights on scikit-learn's digits made 8x imbalanced (digits 3 and 8: 8 training images
    against 64), three draws: the minority digits' test recall is higher with the weights on every draw (measured:
    0.80/0.79/0.69 vs 0.15/0.23/0.26)."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    from transfuse.class_weights import class_weights
    from transfuse.data.dataset import in_memory
    from transfuse.finetune.loop import keras_class_weight, tf_dataset

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    minority = (3, 8)
    got: dict[bool, list[float]] = {False: [], True: []}
    for seed in (0, 1, 2):
        rng = np.random.default_rng(seed)
        train, test = [], []
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(y == c))
            test += idx[:60].tolist()
            train += idx[60:60 + (8 if c in minority else 64)].tolist()
        shard = in_memory(x[train], y[train])
        for weighted in (False, True):
            tf.keras.utils.set_random_seed(seed)
            model = tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(10, activation="softmax")])
            model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            weights = keras_class_weight(class_weights(y[train], 10).tolist() if weighted else None)
            model.fit(tf_dataset(shard, 32, True, seed, True), epochs=10, verbose=0, class_weight=weights)
            pred = model.predict(x[test], verbose=0).argmax(1)
            rows = np.isin(y[test], minority)
            got[weighted].append(float(np.mean(pred[rows] == y[test][rows])))
    assert np.mean(got[True]) > np.mean(got[False]) + 0.05, got
    assert all(w > u for w, u in zip(got[True], got[False])), got
