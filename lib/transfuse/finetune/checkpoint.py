"""What a training checkpoint holds and how it is read and written: the loop's state (``state.json``), every weight
array of the model (``model.weights.npz``; ``model.weights.h5`` in checkpoints of an earlier version), the phase's
optimizer variables (``optimizer.npz``) and the phase's best weights so far (``best.weights.npz``). The worker loop
(``transfuse.finetune.loop``) writes them; the finetune and distill stages, the console and the tests read them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CKPT_WEIGHTS = "model.weights.npz"  # every weight array, in the model's order
LEGACY_CKPT_WEIGHTS = "model.weights.h5"  # checkpoints written before the .npz
BEST_WEIGHTS = "best.weights.npz"  # the phase's best epoch so far, when not the checkpoint's own weights
OPT_STATE = "optimizer.npz"  # the phase's optimizer variables (Adam: step, m, v), mid-phase checkpoints only


@dataclass
class LoopState:
    """Where the loop is, saved in every checkpoint (``state.json``) so a resumed run continues there."""

    phase: int = 0
    phase_epoch: int = 0
    epoch: int = 0  # global, over all phases
    best: Optional[float] = None  # the current phase's lowest val loss
    best_epoch: Optional[int] = None
    bad: int = 0  # epochs since the best
    stopped: bool = False  # early-stopped: the phase is over
    history: list[dict[str, Any]] = field(default_factory=list)
    restored: list[dict[str, Any]] = field(default_factory=list)  # per phase: the best epoch put back at its end
    weights_epoch: Optional[int] = None  # whose weights the checkpoint holds (the best epoch's at a phase end)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LoopState":
        """A checkpoint's state; keys a state of an earlier version lacks keep their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def read(cls, checkpoint_dir: str) -> "LoopState":
        with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
            return cls.from_json(json.load(f))

    def write(self, checkpoint_dir: str) -> None:
        with open(os.path.join(checkpoint_dir, STATE_FILE), "w") as f:
            json.dump(self.to_json(), f)


def save_checkpoint_weights(model: Any, d: str) -> None:
    """A checkpoint's model weights: every weight array in the model's order, as a plain .npz (written once per
    epoch: far quicker than Keras's .h5)."""
    save_arrays(os.path.join(d, CKPT_WEIGHTS), model.get_weights())


def load_checkpoint_weights(model: Any, d: str) -> None:
    """Load what ``save_checkpoint_weights`` wrote (or a checkpoint of an earlier version: Keras .h5)."""
    if os.path.exists(os.path.join(d, CKPT_WEIGHTS)):
        model.set_weights(load_arrays(os.path.join(d, CKPT_WEIGHTS)))
    else:
        model.load_weights(os.path.join(d, LEGACY_CKPT_WEIGHTS))


def save_arrays(path: str, arrays: list[np.ndarray]) -> None:
    """Arrays in order as a plain .npz (a checkpoint-private file; loaded with allow_pickle=False)."""
    np.savez(path, **{f"a{i:05d}": a for i, a in enumerate(arrays)})


def load_arrays(path: str) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return [z[k] for k in sorted(z.files)]


def save_optimizer_state(model: Any, d: str) -> None:
    """A checkpoint's optimizer variables (Adam: step, m, v), so a resumed run continues with the same state."""
    save_arrays(os.path.join(d, OPT_STATE), [v.numpy() for v in model.optimizer.variables])


def read_optimizer_state(d: str) -> Optional[list[np.ndarray]]:
    """What ``save_optimizer_state`` wrote in checkpoint ``d`` (None: a checkpoint without it)."""
    path = os.path.join(d, OPT_STATE)
    return load_arrays(path) if os.path.exists(path) else None


def restore_optimizer(model: Any, arrays: list[np.ndarray], strategy: Any) -> bool:
    """Load a checkpointed optimizer state (Adam's step, m and v) into ``model``'s freshly compiled optimizer.

    The optimizer's slots are created first (``build`` on the trainable variables, in the strategy's scope),
    then assigned; a state whose shapes do not match (a different model or trainable set) is refused and the
    phase continues with a fresh optimizer. Returns whether the state was loaded.
    """
    opt = model.optimizer
    try:
        with strategy.scope():
            opt.build(model.trainable_variables)
        variables = list(opt.variables)
    except (AttributeError, TypeError, ValueError) as e:  # e.g. an optimizer wrapper without build()
        log.warning("cannot restore the optimizer state (%s): continuing with a fresh optimizer", e)
        return False
    if len(variables) != len(arrays) or any(tuple(v.shape) != a.shape for v, a in zip(variables, arrays)):
        log.warning("optimizer state in the checkpoint does not match this model (%d vs %d variables): "
                    "continuing with a fresh optimizer", len(arrays), len(variables))
        return False
    for v, a in zip(variables, arrays):
        v.assign(a)
    return True
