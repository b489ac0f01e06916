"""Compression variants of the ensemble against the seed-style float32 Keras ensemble, measured in one command.

Rows: every variant (float32, pruned, int8, pruned_int8, float16, dynamic_int8) written as a real bundle and
loaded back with ``load_bundle`` (LiteRT, shared trunk, ``num_threads`` threads), and the seed-style baseline:
the float32 tf_keras members run one after another with ``model.predict`` (whole models, no shared trunk; the
same scikit-learn members and combiner). Columns: model bytes raw and gzip, latency at batch 1 (p50, p99 ms),
throughput at batch 32, test accuracy, NLL, ECE, and ratios against float32 and against the Keras baseline.

    # a run's own ensemble (after jobs.ensemble, or tune/finetune members with plain averaging):
    .venv/bin/python bench/compress.py --config configs/default.yaml
    # self-contained: two vgg_small members trained here on a Fashion-MNIST slice (digits if absent)
    .venv/bin/python bench/compress.py --demo
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse.compress import stage as compress
from transfuse.compress import measure, tflite
from transfuse.data import PREPARE
from transfuse.ensemble import fitted
from transfuse.finetune.models import KerasMember
from transfuse.inference.preprocessing import PreprocessSpec, preprocess

ALL = ["float32", "pruned", "int8", "pruned_int8", "float16", "dynamic_int8"]  # pruned kinds: once per sparsity


def demo_members(n_train: int, n_test: int, epochs: int, seed: int = 0):
    """Two vgg_small (width 0.25) members sharing a backbone trained here; a logistic-regression member on the
    first member's embedding and a stacker fitted on a held-out slice (no train example reaches the stacker)."""
    import tensorflow as tf
    from sklearn.linear_model import LogisticRegression

    from transfuse.finetune import models
    from transfuse.inference.bundle_writer import BundleSklearn
    from transfuse.inference.combine import Stacker
    from transfuse.config import HeadConfig, ModelConfig

    fm = Path("/usr/share/datasets/fashion-mnist")
    if (fm / "train-images-idx3-ubyte.gz").is_file():
        from transfuse.data.sources import read_idx

        x = read_idx(str(fm / "train-images-idx3-ubyte.gz"))[..., None]
        y = read_idx(str(fm / "train-labels-idx1-ubyte.gz")).astype(np.int64)
        names, source = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot"], "fashion_mnist"
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = np.clip(d.images * 16, 0, 255).astype(np.uint8)[..., None], d.target.astype(np.int64)
        names, source = [str(i) for i in range(10)], "digits"
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_hold = n_test // 2
    tr, ho, te = idx[:n_train], idx[n_train:n_train + n_hold], idx[n_train + n_hold:n_train + n_hold + n_test]
    mc = ModelConfig(backbone="vgg_small", weights="none", input_size=32, width=0.25, head=HeadConfig(dense=[64]),
                     unfreeze=4)
    spec_all = models.model_spec(mc, 10, names, seed=seed, unfreeze=18)
    pspec = PreprocessSpec(**spec_all["preprocess"])
    xtr = preprocess(x[tr], pspec)
    base = models.build_model(spec_all)  # the "pretrained" backbone: every layer trained here
    base.compile(tf.keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    base.fit(xtr, y[tr], batch_size=64, epochs=epochs, verbose=0)
    members = []
    for i, k in enumerate((4, 8)):
        spec = models.model_spec(mc, 10, names, seed=seed + i + 1, unfreeze=k)
        m = models.build_model(spec)
        models.get_backbone(m).set_weights(models.get_backbone(base).get_weights())
        models.set_unfreeze(m, k)
        m.compile(tf.keras.optimizers.Adam(3e-4), "sparse_categorical_crossentropy")
        m.fit(xtr, y[tr], batch_size=64, epochs=max(1, epochs // 2), verbose=0)
        members.append(KerasMember(f"vgg_u{k}", m, spec))
    emb_net = models.embedding_model(members[0].model)
    lr = LogisticRegression(max_iter=1000).fit(emb_net.predict(xtr, verbose=0), y[tr])
    xho = preprocess(x[ho], pspec)
    hold = {m.name: m.model.predict(xho, verbose=0) for m in members}
    hold["logreg"] = lr.predict_proba(emb_net.predict(xho, verbose=0))
    stacker = Stacker(list(hold), features="log_probs", eps=1e-6).fit(hold, y[ho], num_classes=10)
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    dim = int(emb_net.output.shape[-1])
    onx = convert_sklearn(lr, initial_types=[("embedding", FloatTensorType([None, dim]))],
                          options={id(lr): {"zipmap": False}}).SerializeToString()
    parts = fitted.EnsembleParts(
        sklearn=[BundleSklearn("logreg", onx, embedding_of=members[0].name)],
        stacker=stacker)
    info = {"source": source, "train": len(tr), "stacker_holdout": len(ho), "test": len(te), "epochs": epochs,
            "backbone": "vgg_small width 0.25, 32x32", "members": [m.name for m in members] + ["logreg"]}
    return members, parts, (x[tr], y[tr]), (x[te], y[te]), names, info


def run_members(cfg):
    """The run's ensemble as jobs.compress reads it, and its prepared train/test splits."""
    from transfuse.finetune import models
    from transfuse.data import data_manifest, read_split_numpy

    src, dropped = fitted.ensemble_to_compress(cfg)
    members = [KerasMember(n, *models.load_member(d)) for n, d in src.members]
    data_dir = PREPARE.dir(cfg)
    names = data_manifest(data_dir)["class_names"]
    xtr, ytr, _ = read_split_numpy(data_dir, "train")
    xte, yte, _ = read_split_numpy(data_dir, "test")
    return members, src.parts, (xtr, ytr), (xte, yte), names, {"source": src.source, "run": cfg.run,
                                                                "zero_weight_members": dropped}


def keras_bytes(members, parts) -> tuple[int, int]:
    """Bytes of what the seed ships: each member's .weights.h5 plus the same ONNX sklearn members."""
    import gzip

    raw = gz = 0
    with tempfile.TemporaryDirectory() as d:
        for m in members:
            p = Path(d) / f"{m.name}.weights.h5"
            m.model.save_weights(str(p))
            b = p.read_bytes()
            raw, gz = raw + len(b), gz + len(gzip.compress(b, 9))
    for s in parts.sklearn:
        raw, gz = raw + len(s.data), gz + len(gzip.compress(s.data, 9))
    return raw, gz


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="run config (reads <run>/ensemble or the tune/finetune members)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--demo", action="store_true", help="train two small members here instead of reading a run")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--variants", default=",".join(ALL))
    ap.add_argument("--threads", type=int, default=None,
                    help="LiteRT / ONNX Runtime threads per model (default: compress.num_threads)")
    ap.add_argument("--latency-runs", type=int, default=100)
    ap.add_argument("--breakdown", default="float32,int8",
                    help="variants whose batch-1 time and bytes are split by component (trunk, tops, sklearn, ...)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    from transfuse.config import load_config

    cfg = load_config(args.config, args.overrides)
    t0 = time.time()
    if args.demo:
        members, parts, (xtr, ytr), (xte, yte), names, info = demo_members(args.n_train, args.n_test, args.epochs)
    elif args.config:
        members, parts, (xtr, ytr), (xte, yte), names, info = run_members(cfg)
    else:
        ap.error("give --config FILE or --demo")
    print(f"ensemble: {json.dumps(info)}  (ready in {time.time() - t0:.0f} s)")
    pspec = PreprocessSpec(**members[0].spec["preprocess"])
    ccfg = cfg.compress
    args.threads = args.threads or ccfg.num_threads
    rep_raw = tflite.representative_raw(xtr, ccfg.representative_examples, seed=cfg.seed)
    rep = preprocess(rep_raw, pspec)
    parts0 = parts  # as the ensemble stage wrote them: the seed-style baseline uses these
    if ccfg.optimize_sklearn and parts.sklearn:
        parts, sk_info = compress.optimize_parts(parts, members, rep_raw)
        for name, i in sk_info.items():
            diff = f", max |diff| {i['max_abs_diff']:.2g} on {i['probe_rows']} rows" if "max_abs_diff" in i else ""
            print(f"sklearn {name}: {i['bytes_before']} -> {i['bytes_after']} bytes, rewrites {i['applied']}{diff}")
    variants = [v for v in args.variants.split(",") if v]
    exported, pruning = compress.build_variants(members, variants, rep=rep, x_train=preprocess(xtr, pspec),
                                                y_train=ytr, ccfg=ccfg)
    for variant, per_member in pruning.items():
        for name, p in per_member.items():
            print(f"pruning {variant} {name}: target {p['target']} (scope {p['scope']}, distill {p['distill']}), "
                  f"top-1 agreement with the float member on train {p['train_agreement_with_float']:.3f}, measured "
                  f"per pruned layer { {k: round(v, 3) for k, v in p['layers'].items()} }")
    rows, breakdown = [], {}
    with tempfile.TemporaryDirectory() as d:
        for v, ex in exported.items():
            compress.write_variant(os.path.join(d, v), ex, members, parts, name="bench", version="0",
                                   class_names=names, input_shape=tuple(xtr.shape[1:]), num_threads=args.threads)
            row = measure.variant_row(os.path.join(d, v), xte, yte, num_threads=args.threads,
                                       latency_runs=args.latency_runs)
            row["variant"] = v
            rows.append(row)
            if v in args.breakdown.split(","):
                breakdown[v] = measure.component_breakdown(os.path.join(d, v), xte, num_threads=args.threads,
                                                            runs=args.latency_runs)
        if len(exported) > 1:  # batch-1 latency again, in warm blocks alternating between variants
            lat = measure.blocked_latency({v: os.path.join(d, v) for v in exported}, xte,
                                          num_threads=args.threads, runs=args.latency_runs)
            for r in rows:
                r.update(lat[r["variant"]], latency="blocked")
    base = fitted.keras_baseline(members, parts0, pspec)
    row = {"variant": "keras_seq"}
    row["size_bytes"], row["size_gzip_bytes"] = keras_bytes(members, parts0)
    row.update(measure.measure_predictor(base, xte, yte, latency_runs=max(10, args.latency_runs // 5)))
    rows.append(row)
    rows = measure.with_ratios(rows, "float32")
    print(f"\nvariants ({len(yte)} test images; LiteRT num_threads={args.threads}; batch-1 latency of the bundles "
          f"timed in alternating warm blocks; ratios x* against the float32 bundle measured in this command)")
    print(measure.format_table(rows))
    kb = next(r for r in rows if r["variant"] == "keras_seq")
    print("\nagainst the seed-style baseline (float32 tf_keras members, model.predict one after another):")
    for r in rows:
        if r["variant"] != "keras_seq":
            print(f"  {r['variant']:<13} {kb['p50_ms_b1'] / r['p50_ms_b1']:6.1f}x faster at batch 1, "
                  f"{r['throughput_b32'] / kb['throughput_b32']:6.2f}x throughput at batch 32, "
                  f"{kb['size_bytes'] / r['size_bytes']:5.2f}x smaller, "
                  f"accuracy {100 * (r['accuracy'] - kb['accuracy']):+.2f} points")
    for v in ("int8", "pruned_int8"):
        g = measure.goals(rows, cfg.goals, v)
        if g:
            print("goals " + measure.goals_line(g))
    for v, b in breakdown.items():
        print(f"\nwhere batch-1 time and bytes go: {v} (num_threads={args.threads}; parts timed in pipeline order)")
        print(measure.format_breakdown(b))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows, "pruning": pruning,
                                               "breakdown": breakdown}, indent=2))


if __name__ == "__main__":
    main()
