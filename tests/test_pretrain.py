"""The pretrain stage's completion rule (transfuse.finetune.pretraining): a complete stage returns its saved metrics
without running; the pretrain, model and seed sections of the config (and force) make it run again, other sections do
not.

The source data here is an image folder that does not exist, so a stage that does run stops at its first step,
preparing that data, with a DataError naming the folder: these tests take seconds and train nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import smoke_config
from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow)
from transfuse import storage
from transfuse.config import Config
from transfuse.data import DataError
from transfuse.finetune import PRETRAIN, PRETRAIN_DATA
from transfuse.finetune.pretraining import pretrain

pytest.importorskip("tensorflow")

METRICS = {"history": [{"epoch": 1, "loss": 1.25, "val_loss": 1.5}], "source_classes": ["0", "2", "4"],
           "test": {"accuracy": 0.625, "nll": 1.125, "ece": 0.0625, "n": 8}}


def _cfg(tmp_path: Path, *overrides: str) -> Config:
    missing = tmp_path / "no-such-folder"
    return smoke_config(tmp_path, overrides=["model.weights=pretrain",
                                             f"pretrain.data={{source: image_folder, path: {missing}}}", *overrides])


def _complete(cfg: Config) -> str:
    """The stage's folder as a finished pretrain() leaves it for ``cfg``: metrics.json, then the manifest last,
    with the fingerprint of the config's pretrain, model and seed sections."""
    out = PRETRAIN.dir(cfg)
    storage.write_json(storage.join(out, "metrics.json"), METRICS)
    storage.write_manifest(out, cfg, PRETRAIN.folder, cfg.fingerprint("pretrain", "model", "seed"))
    return out


@pytest.mark.parametrize("overrides", [
    [], ["train.epochs_frozen=4", "train.lr_frozen=0.01"], ["data.rows_per_shard=100"], ["ensemble.folds=5"],
    ["tune.num_samples=3"]], ids=["same", "train", "target-data", "ensemble", "tune"])
def test_a_complete_stage_returns_its_metrics_without_running(tmp_path, overrides):
    """The target task's data, training, search and ensemble settings do not touch the pretrained backbone."""
    _complete(_cfg(tmp_path))
    assert pretrain(_cfg(tmp_path, *overrides)) == METRICS
    assert pretrain(_cfg(tmp_path, *overrides), resume=True) == METRICS
    assert not storage.exists(PRETRAIN_DATA.dir(_cfg(tmp_path)))  # the source was never prepared


@pytest.mark.parametrize("overrides, force", [
    ([], True), (["pretrain.epochs=2"], False), (["pretrain.lr=0.01"], False),
    (["pretrain.data.classes=[cat, dog]"], False), (["model.width=0.25"], False), (["model.head.dense=[32]"], False),
    (["seed=1"], False)],
    ids=["force", "epochs", "lr", "source-classes", "width", "head", "seed"])
def test_force_or_a_changed_pretrain_model_or_seed_section_runs_the_stage_again(tmp_path, overrides, force):
    _complete(_cfg(tmp_path))
    with pytest.raises(DataError, match=r"image folder not found: .*no-such-folder"):
        pretrain(_cfg(tmp_path, *overrides), force=force)


def test_an_incomplete_stage_runs_again(tmp_path):
    """metrics.json alone (the manifest, written last, missing: an interrupted run) is not a finished stage."""
    cfg = _cfg(tmp_path)
    storage.write_json(PRETRAIN.metrics_path(cfg), METRICS)
    with pytest.raises(DataError, match=r"image folder not found"):
        pretrain(cfg)
