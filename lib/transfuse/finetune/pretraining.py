"""Pretraining a backbone on a source task, for where no pretrained weights exist (the offline default).

ImageNet weights cannot be downloaded offline, so the default pretrains its own backbone: the source data
(``cfg.pretrain.data``, e.g. Fashion-MNIST's even classes) is prepared into ``<run>/pretrain_data/``, the whole
network (backbone + the configured head) trains on Ray Train with the same worker loop as fine-tuning, and
the backbone's weights go to ``<run>/pretrain/backbone.weights.h5`` (what ``model.weights: pretrain`` loads).
"""

from __future__ import annotations

import logging
from typing import Any

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse import storage
from transfuse.config import Config
from transfuse.finetune import PRETRAIN, PRETRAIN_DATA

log = logging.getLogger(__name__)



def pretrain(cfg: Config, *, force: bool = False, resume: bool = False) -> dict[str, Any]:
    """Prepare the source data, train the whole network on it, save the backbone weights + manifest."""
    import tensorflow as tf

    from transfuse.data import data_manifest, prepare, preprocessed, read_split, training_rows
    from transfuse.finetune import loop
    from transfuse.finetune import models
    from transfuse.finetune import stage
    from transfuse.inference import PreprocessSpec
    from transfuse.metrics import evaluate

    out_dir = PRETRAIN.dir(cfg)
    fp = cfg.fingerprint("pretrain", "model", "seed")
    if storage.skip_complete(out_dir, fp, PRETRAIN.folder, force):
        return PRETRAIN.metrics(cfg)
    prepare(cfg, data_cfg=cfg.pretrain.data, stage=PRETRAIN_DATA.folder)
    data_dir = PRETRAIN_DATA.dir(cfg)
    manifest = data_manifest(data_dir)
    class_names = manifest["class_names"]
    names = models.layer_names_of(cfg.model.backbone, cfg.model.input_size, cfg.model.width)
    # the whole backbone trains from random initialisation; BatchNorm (where the backbone has it) in training mode
    spec = models.model_spec(cfg.model, len(class_names), class_names, seed=cfg.seed,
                             unfreeze=models.unfreeze_units(cfg.model))
    tf.keras.mixed_precision.set_global_policy("float32")
    init_path = storage.join(out_dir, stage.INIT_DIR, "initial.weights.h5")
    models.save_weights(models.build_model(spec, None, bn_training=True), init_path)
    pspec = PreprocessSpec(**spec["preprocess"])
    if cfg.train.materialize:  # preprocessed once, every worker keeps its shard
        datasets = {f"{s}_image": preprocessed(read_split(data_dir, s), pspec).select_columns(["x", "label"])
                    .materialize() for s in ("train", "val")}
    else:  # streamed stored rows, preprocessed by the workers
        datasets = {f"{s}_image": training_rows(data_dir, s) for s in ("train", "val")}
    phases = [loop.Phase("pretrain", len(names), cfg.pretrain.epochs, cfg.pretrain.lr, None,
                         "train_image", "val_image", images=not cfg.train.materialize)]
    # the same worker loop as fine-tuning (``transfuse.finetune.loop.train_func``): one phase, every layer trains
    loop_cfg = loop.LoopConfig(spec=spec, init_weights=init_path, phases=phases,
                               batch_size=cfg.pretrain.batch_size, patience=cfg.train.early_stopping_patience,
                               seed=cfg.seed, policy=stage.mixed_policy(cfg.train.mixed_precision, cfg.train.use_gpu),
                               cached=False, in_memory=cfg.train.materialize, bn_training=True)
    train_path = storage.join(out_dir, stage.TRAIN_DIR)
    if not resume:
        storage.delete(train_path)
    trainer = stage.make_trainer(cfg.train, loop_cfg, datasets, out_dir)
    result = trainer.fit()
    if result.checkpoint is None:
        raise loop.TrainError(f"pretraining finished without a checkpoint in {train_path}")
    with result.checkpoint.as_directory() as d:
        state = loop.LoopState.read(d)
        model = models.build_model(spec, None, bn_training=True)
        loop.load_checkpoint_weights(model, d)
    models.save_weights(models.get_backbone(model), storage.join(out_dir, models.BACKBONE_WEIGHTS))
    from transfuse.data import read_split_numpy
    from transfuse.inference import preprocess

    images, labels, _ = read_split_numpy(data_dir, "test")
    evals = {}
    if len(labels):
        probs = model.predict(preprocess(images, pspec), batch_size=256, verbose=0)
        evals["test"] = evaluate(probs, labels)
    metrics = {"history": state.history, "source_classes": class_names, **evals}
    storage.write_json(PRETRAIN.metrics_path(cfg), metrics)
    storage.write_json(storage.join(out_dir, "model_spec.json"), spec)
    storage.write_manifest(out_dir, cfg, PRETRAIN.folder, fp, metrics=evals, epochs=state.epoch,
                           backbone=cfg.model.backbone, source=manifest.get("counts"))
    return metrics
