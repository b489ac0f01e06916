"""How far the fine-tune, scratch and tune stages are, read from the Ray Train checkpoints they write (the
console's progress bars)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from transfuse import storage

# (done, total, unit) of a running stage, or None while nothing can be read yet
Reading = Optional[tuple[int, int, str]]


def newest_checkpoint_file(train_dir: str, name: str, since: float) -> Optional[str]:
    """``name`` in the newest Ray Train checkpoint under ``train_dir`` that has it written since ``since``: a
    checkpoint being written has no such file yet, and one an earlier run left is not this run's progress."""
    for d in reversed([d for d in storage.list_dirs(train_dir) if d.startswith("checkpoint_")]):  # newest last
        path = storage.join(train_dir, d, name)
        if storage.written_since(path, since):
            return path
    return None


def epochs_done(member_dir: str, since: float = 0.0) -> int:
    """The epoch of the newest Ray Train checkpoint under a member dir written since ``since`` (0 before the
    first one)."""
    from transfuse.finetune.loop import STATE_FILE, LoopState
    from transfuse.finetune.stage import TRAIN_DIR

    path = newest_checkpoint_file(storage.join(member_dir, TRAIN_DIR), STATE_FILE, since)
    return 0 if path is None else LoopState.from_json(storage.read_json(path)).epoch


def _epochs(cfg: Any) -> int:
    return cfg.train.epochs_frozen + cfg.train.epochs_unfrozen


def finetune(cfg: Any, since: float) -> Callable[[], Reading]:
    from transfuse.finetune import FINETUNE

    d = FINETUNE.dir(cfg)
    return lambda: (epochs_done(d, since), _epochs(cfg), "epochs")


def scratch(cfg: Any, since: float) -> Callable[[], Reading]:
    from transfuse.finetune import SCRATCH

    d = SCRATCH.dir(cfg)
    return lambda: (epochs_done(d, since), _epochs(cfg), "epochs")


def tune(cfg: Any, since: float) -> Callable[[], Reading]:
    from transfuse.finetune import TUNE
    from transfuse.finetune.tune import TRIALS_DIR

    trials = TUNE.path(cfg, TRIALS_DIR)
    total = cfg.tune.num_samples * _epochs(cfg)
    return lambda: (sum(epochs_done(storage.join(trials, t), since) for t in storage.list_dirs(trials)), total,
                    "trial epochs")
