"""The trained ensemble as the stages after it read it: the CNN member dirs, the scikit-learn members (ONNX
bytes) and the stacker from ``ensemble/`` (or the tuned members alone, averaged), less the members the stacker
gives zero weight; and its float32 predictor on raw images (``keras_baseline``): compress's baseline and the
distill stage's teacher."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from transfuse.config import Config
from transfuse.ensemble import ENSEMBLE
from transfuse.finetune import FINETUNE, KerasMember
from transfuse.inference import BundleSklearn, EnsembleError, PreprocessSpec, Stacker, combine_probs, preprocess

log = logging.getLogger(__name__)


@dataclass
class EnsembleParts:
    """What the bundle needs besides the CNNs: sklearn members (ONNX bytes) and the stacker (None: average)."""

    sklearn: list[BundleSklearn] = field(default_factory=list)
    stacker: Optional[Stacker] = None


@dataclass
class EnsembleSource:
    """The ensemble to compress, as read from ``<run>/ensemble/`` (or from the member dirs alone)."""

    members: list[tuple[str, str]]  # (name, member dir) of the CNN members, in order
    parts: EnsembleParts
    source: str  # "ensemble" (stacker + sklearn members) or "members" (plain averaging)
    fingerprint: str


def read_ensemble(cfg: Config) -> EnsembleSource:
    """The CNN member dirs, sklearn members (ONNX) and stacker written by ``jobs.ensemble``
    (``ensemble.json``, format transfuse.ensemble/v1). Without an ensemble stage: the members chosen by Tune
    (``tune/members.json``) or the single ``finetune/`` model, combined by plain averaging."""
    import hashlib

    from transfuse import storage

    from transfuse.ensemble import stage as ensemble

    h = hashlib.sha256(cfg.fingerprint("compress", "data").encode())
    ens_dir = ENSEMBLE.dir(cfg)
    desc_path = storage.join(ens_dir, ensemble.DESCRIPTION_FILE)
    desc = ensemble.read_description(ens_dir, missing_ok=True)
    if desc is not None:
        members = [(str(m["name"]), str(m["dir"])) for m in desc["cnn_members"]]
        sk = [BundleSklearn(name=m.name, data=storage.read_bytes(storage.join(ens_dir, m.file)),
                            embedding_of=m.embedding_source, probabilities_output=m.output, features=m.features,
                            pixel_size=m.pixel_size)
              for m in ensemble.saved_sklearn_members(desc)]
        man = storage.join(ens_dir, storage.MANIFEST)
        h.update((storage.sha256(man) if storage.exists(man) else storage.sha256(desc_path)).encode())
        return EnsembleSource(members, EnsembleParts(sk, ensemble.read_stacker(ens_dir, desc)), "ensemble",
                              h.hexdigest()[:16])
    from transfuse.finetune import MEMBERS_FILE, read_members, tune_dir

    tuned = read_members(cfg)
    if tuned is not None:
        members = [(m.name, m.dir) for m in tuned]
    else:
        ft = FINETUNE.dir(cfg)
        if not storage.exists(storage.join(ft, "model_spec.json")):
            raise EnsembleError(f"nothing to compress: no {desc_path} (jobs.ensemble), no "
                                f"{storage.join(tune_dir(cfg), MEMBERS_FILE)} (jobs.tune) and no "
                                f"{ft}/model_spec.json (jobs.finetune); run one of them first")
        members = [("finetune", ft)]
    for _, d in members:
        man = storage.join(d, storage.MANIFEST)
        h.update((storage.sha256(man) if storage.exists(man) else d).encode())
    log.warning("no ensemble stage output at %s: compressing the CNN members with plain averaging", ens_dir)
    return EnsembleSource(members, EnsembleParts(), "members", h.hexdigest()[:16])


def drop_zero_weight_members(src: EnsembleSource) -> tuple[EnsembleSource, dict[str, Any]]:
    """``src`` without the members whose stacker coefficients are all exactly zero: the stacker's output does not
    depend on them. A CNN member whose embedding a kept sklearn member reads stays (its weight stays 0). Without a
    stacker (plain averaging) nothing is dropped. Returns the new source and what was dropped and kept."""
    import dataclasses

    st = src.parts.stacker
    if st is None:
        return src, {"dropped": [], "reason": "no stacker (plain averaging): every member counts"}
    k = st.coef_.shape[1] // len(st.members)
    coef = np.asarray(st.coef_)
    dead = {m for j, m in enumerate(st.members) if not np.any(coef[:, j * k:(j + 1) * k])}
    sk = [s for s in src.parts.sklearn if s.name not in dead]
    needed = {s.embedding_of for s in sk if s.features == "embedding"}
    cnn = [(n, d) for n, d in src.members if n not in dead or n in needed]
    if not cnn:  # a bundle needs a CNN member for its input pipeline: keep the first, weight 0
        cnn = src.members[:1]
    keep = [m for m in st.members if m in {n for n, _ in cnn} | {s.name for s in sk}]
    if len(keep) == len(st.members):
        return src, {"dropped": [], "kept": keep}
    cols = np.concatenate([np.arange(st.members.index(m) * k, (st.members.index(m) + 1) * k) for m in keep])
    stacker = dataclasses.replace(st, coef_=coef[:, cols], members=keep)
    info = {"dropped": [m for m in st.members if m not in keep], "kept": keep,
            "kept_at_zero_weight": sorted(dead & set(keep))}
    log.info("members with zero stacker weight left out of every variant: %s", info)
    return EnsembleSource(cnn, EnsembleParts(sk, stacker), src.source, src.fingerprint), info


def ensemble_to_compress(cfg: Config) -> tuple[EnsembleSource, dict[str, Any]]:
    """``read_ensemble``, less the zero-weight members when ``compress.drop_zero_weight_members``: what the stage
    and bench/compress.py compress. Returns (source, what was dropped)."""
    src = read_ensemble(cfg)
    return drop_zero_weight_members(src) if cfg.compress.drop_zero_weight_members else (src, {"dropped": []})


def keras_baseline(members: list[KerasMember], parts: EnsembleParts,
                   spec: PreprocessSpec) -> Callable[[np.ndarray], np.ndarray]:
    """The seed-style float32 ensemble: each tf_keras member's ``model.predict`` one after another (whole model,
    no shared trunk), the same sklearn members (ONNX on the Keras embedding) and the same combiner."""
    import tempfile
    from pathlib import Path

    import tensorflow as tf

    from transfuse import finetune
    from transfuse.inference import OnnxRunner

    nets = {m.name: tf.keras.Model(m.model.input, [m.model.output, finetune.embedding_model(m.model).output])
            for m in members}
    tmp = Path(tempfile.mkdtemp(prefix="transfuse-baseline-"))
    sk = []
    for i, s in enumerate(parts.sklearn):
        (tmp / f"{i}.onnx").write_bytes(s.data)
        sk.append((s, OnnxRunner(tmp / f"{i}.onnx", 1, s.name)))

    def predict(images: np.ndarray) -> np.ndarray:
        x = preprocess(images, spec)
        probs, emb = {}, {}
        for name, net in nets.items():
            p, e = net.predict(x, verbose=0, batch_size=256)
            probs[name], emb[name] = p.astype(np.float64), e
        for s, r in sk:
            probs[s.name] = np.asarray(r(s.inputs(images, emb))[s.probabilities_output], np.float64)
        st = parts.stacker
        p = combine_probs(probs, list(probs)) if st is None else st.predict_proba(probs)
        return p.astype(np.float32)

    return predict


__all__ = ["EnsembleParts", "EnsembleSource", "drop_zero_weight_members", "ensemble_to_compress", "keras_baseline",
           "read_ensemble"]
