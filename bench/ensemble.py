"""Ensemble benchmark: members vs average / hard vote / greedy / stack on test, and Ray tasks vs sequential fitting.

Members are real fitted networks standing in for the CNNs (one-hidden-layer MLPs on digits pixels, trained on
train only; their hidden layer is the "embedding"), plus the configured scikit-learn learners on the best MLP's
embeddings. Both runners fit the same tasks in the same run, so the wall-time ratio compares like with like.

python bench/ensemble.py [--seeds 0 1 2] [--folds 5] [--cpus 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from transfuse import environment
from transfuse.config import EnsembleConfig, MemberConfig
from transfuse.ensemble.stage import fit_ensemble, format_table
from transfuse.ensemble.inputs import EnsembleInputs
from transfuse.ensemble.learners import LocalRunner, RayRunner

MEMBERS = [  # small but real settings: the development machine has 2 shared cores
    MemberConfig(name="rf", kind="random_forest", params={"n_estimators": 100}),
    MemberConfig(name="bagging", kind="bagging", params={"n_estimators": 10}),
    MemberConfig(name="ada", kind="adaboost", params={"n_estimators": 50}),
    MemberConfig(name="hgb", kind="hist_gradient_boosting", params={"max_iter": 50}),
    MemberConfig(name="svc", kind="svc", params={"C": 1.0}),
    MemberConfig(name="logreg", kind="logistic_regression", params={"C": 1.0, "max_iter": 1000}),
]


def digits_inputs(seed: int = 0) -> EnsembleInputs:
    """Digits split 40/10/20/30 (train/val/holdout/test) and three MLP "CNN" members of different widths."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    ids = np.array([f"d{i:04d}" for i in range(len(y))])
    perm = np.random.default_rng(seed).permutation(len(y))
    cut = np.cumsum([int(f * len(y)) for f in (0.4, 0.1, 0.2)])
    parts = dict(zip(("train", "val", "holdout", "test"), np.split(perm, cut)))
    parts = {s: idx[np.argsort(ids[idx])] for s, idx in parts.items()}
    probs, seen, emb, best = {}, {}, None, -1.0
    for name, hidden, s in (("mlp16", 16, 0), ("mlp32", 32, 1), ("mlp64", 64, 2)):
        m = MLPClassifier((hidden,), max_iter=300, early_stopping=False, random_state=s).fit(x[parts["train"]],
                                                                                           y[parts["train"]])
        probs[name] = {sp: m.predict_proba(x[parts[sp]]) for sp in ("holdout", "test")}
        seen[name] = np.concatenate([ids[parts["train"]], ids[parts["val"]]])
        val_acc = m.score(x[parts["val"]], y[parts["val"]])
        if val_acc > best:
            best, source = val_acc, name
            emb = {sp: np.maximum(x[parts[sp]] @ m.coefs_[0] + m.intercepts_[0], 0).astype(np.float32)
                   for sp in ("train", "holdout", "test")}
    return EnsembleInputs(ids={s: ids[parts[s]] for s in ("train", "holdout", "test")},
                          labels={s: y[parts[s]].astype(np.int64) for s in ("train", "holdout", "test")},
                          embeddings=emb, num_classes=10, cnn_probs=probs, cnn_fit_ids=seen,
                          embedding_source=source)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    args = p.parse_args()
    inp = digits_inputs()
    ecfg = EnsembleConfig(members=MEMBERS, folds=args.folds, seeds=args.seeds)
    environment.init_ray(num_cpus=args.cpus)
    t0 = time.perf_counter()
    ray_fit = fit_ensemble(inp, ecfg, RayRunner(1.0))
    t_ray = time.perf_counter() - t0
    t0 = time.perf_counter()
    local_fit = fit_ensemble(inp, ecfg.model_copy(update={"parallel": "local"}), LocalRunner())
    t_local = time.perf_counter() - t0
    same = all(np.allclose(a.test_probs[m], b.test_probs[m]) for a, b in zip(ray_fit.seeds, local_fit.seeds)
               for m in a.member_order)
    tasks = len(ray_fit.data_object_ids)
    print(f"embedding source: {inp.embedding_source}; {tasks} fit tasks; seeds {args.seeds}; folds {args.folds}")
    print(format_table({"summary": ray_fit.summary()}))
    s = ray_fit.summary()
    best = max(ray_fit.first.member_order, key=lambda m: s[m]["accuracy"]["mean"])
    print(f"best member {best}: acc {s[best]['accuracy']['mean']:.4f} nll {s[best]['nll']['mean']:.4f}; "
          f"stack acc {s['stack']['accuracy']['mean']:.4f} nll {s['stack']['nll']['mean']:.4f}")
    print(f"fit wall: ray {t_ray:.1f}s, local {t_local:.1f}s, local/ray = {t_local / t_ray:.2f}x; "
          f"same predictions: {same}; distinct data objects read by ray tasks: "
          f"{len(set(ray_fit.data_object_ids))}")
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
