"""Frozen base recomputed every epoch (the seed recipe) vs computed once (this project's cache), one command.

Same data, same frozen backbone (same initial weights), same head, same epochs, same batches:
- naive:  model.fit on image arrays with the backbone frozen, ``--epochs`` epochs (the base runs every epoch);
- cached: ``transfuse.finetune.cache.ensure_cache`` once (the activations written as parquet, then read back), then the
          head trained on the cached activations for the same epochs. Timed twice, each building its own cache:
          [default] as configured (small data on CPUs: computed in this process) and [actors] with the Ray Data
          actor pool forced (what a GPU cluster runs), so the start-up cost of the actor path stays visible.
Prints both times, the ratio, both test accuracies, images/s and the achieved fraction of the machine's matmul
peak (measured here, float32). Optionally (--ray-train) also times the whole ``finetune`` on Ray Train.

    .venv/bin/python bench/finetune.py                       # VGG16 at 32x32, Fashion-MNIST slice
    .venv/bin/python bench/finetune.py --backbone vgg_small --per-class 100
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow)


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    """float32 GFLOP/s of one large TensorFlow matmul, best of ``reps`` (the machine's practical peak)."""
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    tf.linalg.matmul(a, b).numpy()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        tf.linalg.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def conv_flops(backbone) -> float:
    """Multiply-adds x 2 of the backbone's Conv2D layers for one image (the dominant cost)."""
    import tensorflow as tf

    total = 0.0
    for layer in backbone.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            _, h, w, cout = layer.output.shape
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            total += 2.0 * h * w * kh * kw * cin * cout
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vgg16", help="vgg16 (the seed's) or vgg_small")
    p.add_argument("--width", type=float, default=0.25, help="vgg_small only")
    p.add_argument("--per-class", type=int, default=200, help="train images per class (Fashion-MNIST, 10 classes)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache", choices=["both", "default", "actors"], default="both",
                   help="cached path(s) timed: the default (driver for small CPU data) and/or the actor pool")
    p.add_argument("--actor-cpus", type=float, default=1.0,
                   help="CPUs per cache actor in [actors] mode (train.cache_actor_cpus; sets its threads)")
    p.add_argument("--ray-train", action="store_true", help="also time transfuse.finetune.stage.finetune end to end")
    args = p.parse_args()

    import numpy as np
    import tensorflow as tf

    from transfuse.finetune import cache

    from transfuse.finetune import models
    from transfuse.config import load_config
    from transfuse.data import data_manifest, prepare, read_split_numpy
    from transfuse.metrics import evaluate
    from transfuse.inference.preprocessing import PreprocessSpec, preprocess

    environment.init_ray(num_cpus=4)
    storage_dir = tempfile.mkdtemp(prefix="bench_finetune_")
    source = ["data.source=fashion_mnist"] if os.path.exists("/usr/share/datasets/fashion-mnist") else \
        ["data.source=digits"]
    cfg = load_config(None, [
        f"storage={storage_dir}", "run=bench", *source, f"data.train_per_class={args.per_class}",
        f"data.limit_per_class={args.per_class * 2}", "data.split.val=0.1", "data.split.test=0.3",
        "data.split.holdout=0.05", f"model.backbone={args.backbone}", "model.weights=none",
        f"model.width={args.width}", "model.head.dense=[256]", f"train.batch_size={args.batch_size}",
        f"train.epochs_frozen={args.epochs}", "train.epochs_unfrozen=0", "model.unfreeze=0",
    ])
    prepare(cfg)
    data_dir = os.path.join(storage_dir, "bench", "data")
    man = data_manifest(data_dir)
    names = man["class_names"]
    spec = models.model_spec(cfg.model, len(names), names, seed=0, unfreeze=0)
    pspec = PreprocessSpec(**spec["preprocess"])
    xtr, ytr, _ = read_split_numpy(data_dir, "train")
    xte, yte, _ = read_split_numpy(data_dir, "test")
    xtr, xte = preprocess(xtr, pspec), preprocess(xte, pspec)
    n_train = len(ytr)
    print(f"data: {man.get('source', cfg.data.source)} train {n_train}, test {len(yte)}; {args.backbone} "
          f"at 32x32, head Flatten-Dense(256)-Dense({len(names)}), {args.epochs} epochs, batch {args.batch_size}")

    peak = matmul_peak_gflops()
    init = models.build_model(spec)
    init_path = os.path.join(storage_dir, "init.weights.h5")
    init.save_weights(init_path)
    flops = conv_flops(models.get_backbone(init))
    print(f"matmul peak (float32, 2048^2, best of 10): {peak:.1f} GFLOP/s; backbone conv FLOPs/image: "
          f"{flops / 1e6:.1f} M")

    # --- naive: the seed recipe (base frozen but recomputed every epoch)
    naive = models.build_model(spec)
    naive.load_weights(init_path)
    models.set_unfreeze(naive, 0)
    naive.compile(tf.keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
    t = time.perf_counter()
    naive.fit(xtr, ytr, epochs=args.epochs, batch_size=args.batch_size, shuffle=False, verbose=0)
    t_naive = time.perf_counter() - t
    acc_naive = evaluate(naive.predict(xte, verbose=0), yte)["accuracy"]

    # --- cached: frozen activations once (-> parquet), then the head only. Two ways, each from nothing (its own
    # cache dir): the default (in this process for small data on CPUs) and the Ray Data actor pool forced
    cut = spec["backbone_layers"][-1]
    ips_naive = n_train * args.epochs / t_naive  # training images per second over all epochs
    frac_naive = ips_naive * flops / 1e9 / peak  # backbone forward FLOP/s vs the matmul peak
    print(f"naive  (base recomputed each epoch): {t_naive:7.1f} s  test acc {acc_naive:.4f}  "
          f"{ips_naive:7.1f} img/s  backbone at {100 * frac_naive:.1f}% of matmul peak")
    modes = {"default": cfg.train.cache_in_driver_max_rows, "actors": 0}
    for mode in ([args.cache] if args.cache != "both" else list(modes)):
        mcfg = cfg.model_copy(update={"run": f"bench_{mode}"})
        cached = models.build_model(spec)
        cached.load_weights(init_path)
        key = cache.cache_key(spec, cut, cache.trunk_digest(cached, cut), man.get("fingerprint", ""))
        t = time.perf_counter()
        dirs = cache.ensure_cache(mcfg, data_dir, spec, init_path, {key: cut}, splits=("train",),
                                  batch_size=cfg.train.cache_batch_size, in_driver_max_rows=modes[mode],
                                  actor_cpus=args.actor_cpus)
        ftr, ytr_c = cache.read_cache_numpy(dirs[cut], "train")  # counted: the head needs the activations
        t_cache = time.perf_counter() - t
        assert np.array_equal(ytr_c, ytr), "cache rows must be in the same (id) order as the arrays"
        prof = dict(cache.PROFILE)
        _, top = models.split_model(cached, cut)
        top.compile(tf.keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
        t = time.perf_counter()
        top.fit(ftr, ytr, epochs=args.epochs, batch_size=args.batch_size, shuffle=False, verbose=0)
        t_top = time.perf_counter() - t
        t_cached = t_cache + t_top
        acc_cached = evaluate(cached.predict(xte, verbose=0), yte)["accuracy"]
        ips_cached = n_train * args.epochs / t_cached
        frac_cached = n_train * flops / t_cache / 1e9 / peak
        where = (f"Ray Data actor pool, {args.actor_cpus:g} CPU/actor" if prof.get("where") == "actors"
                 else "in the driver process")
        print(f"cached [{mode}] (base once, {where}): {t_cached:7.1f} s  test acc {acc_cached:.4f}  "
              f"{ips_cached:7.1f} img/s  (cache {t_cache:.1f} s, backbone at {100 * frac_cached:.1f}% of peak "
              f"incl. start-up; head {t_top:.1f} s)")
        if prof:
            print(f"  cache breakdown: pass {prof['pass_s']:.1f} s (first output after {prof['first_batch_s']:.1f} s);"
                  f" TF import + model build {prof['actor_init_s']:.1f} s, model {prof['actor_model_s']:.1f} s, "
                  f"parquet writes {prof['actor_write_s']:.1f} s; outside the pass (lock, manifest, read back) "
                  f"{t_cache - prof['pass_s']:.1f} s")
        print(f"  speed-up cached [{mode}] vs naive: {t_naive / t_cached:.2f}x; accuracy difference "
              f"{acc_cached - acc_naive:+.4f}")
    if args.ray_train:
        from transfuse.finetune.stage import finetune

        t = time.perf_counter()
        m = finetune(cfg, os.path.join(storage_dir, "bench", "finetune"), force=True)
        print(f"transfuse.finetune.stage.finetune on Ray Train (1 worker, cache reused, + outputs): "
              f"{time.perf_counter() - t:.1f} s, test acc {m['test']['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
