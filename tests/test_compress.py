"""Compression: pruning reaches (and is checked against) the target sparsity; every quantized variant loads and
predicts; the shared trunk gives the members' own outputs; the variant table; the compress job end to end."""

from __future__ import annotations

import numpy as np
import pytest

from _compress_helpers import CLASS_NAMES, trained
from transfuse.compress import stage as compress
from transfuse.compress import BUNDLE, COMPRESS, measure, onnx_rewrite, prune, tflite
from transfuse.config import GoalsConfig
from transfuse.data import PREPARE
from transfuse.ensemble import ENSEMBLE, fitted
from transfuse.finetune import TUNE
from transfuse.finetune.models import KerasMember
from transfuse.inference.bundle import load_bundle
from transfuse.inference.bundle_writer import BundleSklearn
from transfuse.inference.preprocessing import PreprocessSpec, preprocess

SPEC = PreprocessSpec(32, "unit")


@pytest.fixture(scope="module")
def setup():
    d, members = trained()
    # 400 calibration images: with 64, per-tensor activation ranges were visibly worse (top-1 agreement -1 pt)
    return d, members, preprocess(d.x_train, SPEC), preprocess(tflite.representative_raw(d.x_train, 400), SPEC)


def test_pruning_reaches_target_sparsity(setup):
    d, members, x_tr, _ = setup
    x_tr, y_tr = x_tr[:512], d.y_train[:512]  # 8 steps at batch 64: enough for masks at steps 0 and 5
    before = [w.copy() for w in members[0].model.get_weights()]
    pruned, sp = prune.prune_member(members[0], x_tr, y_tr, sparsity=0.5, frequency=5, scope="all")
    # the member itself is untouched (TFMOT writes masks into the layers it wraps: a copy is pruned)
    assert all(np.array_equal(a, b) for a, b in zip(before, members[0].model.get_weights()))
    # measured again from the pruned model's own weights, not from the function's report
    for layer in prune.walk_layers(pruned.model):
        if type(layer).__name__ in ("Conv2D", "Dense"):
            assert abs(float(np.mean(layer.kernel.numpy() == 0)) - 0.5) < 0.02, layer.name
    assert set(sp) == {"block1_conv1", "block2_conv1", "block3_conv1", "head_dense0", "head_logits"}
    # a clean graph: it can be cut for export like any member (regression: stripped layers kept 2 nodes)
    from transfuse.finetune import models

    trunk, top = tflite.member_graph(pruned.model, "block1_pool")
    x = preprocess(d.x_test[:8], SPEC)
    np.testing.assert_allclose(top.predict(trunk.predict(x, verbose=0), verbose=0)[1], _logits(pruned.model, x),
                               atol=1e-4)
    assert models.embedding_model(pruned.model).output.shape[-1] == 32
    assert [l.trainable for l in models.get_backbone(pruned.model).layers[1:]] == \
        [l.trainable for l in models.get_backbone(members[0].model).layers[1:]]  # frozen stays frozen
    # the pruned member keeps the member's structure and still classifies (chance is 0.1)
    acc = (pruned.model.predict(preprocess(d.x_test, SPEC), verbose=0).argmax(1) == d.y_test).mean()
    assert acc > 0.3
    # frozen layers pruned identically in two members: the trunk is still shared
    pruned1, _ = prune.prune_member(members[1], x_tr, y_tr, sparsity=0.5, frequency=5, scope="all")
    assert tflite.shared_cut([pruned, pruned1]) == tflite.shared_cut(members)


def test_prune_scope_trainable_leaves_frozen_layers_dense(setup):
    """scope=trainable prunes only what each member fine-tuned: its frozen layers keep their exact weights (so
    the pruned members still share the float members' trunk), the fine-tuned ones reach the target."""
    from transfuse.finetune import models

    d, members, x_tr, _ = setup
    x_tr, y_tr = x_tr[:512], d.y_train[:512]
    out = []
    for m in members:
        pruned, sp = prune.prune_member(m, x_tr, y_tr, sparsity=0.8, frequency=5, scope="trainable")
        trainable = {l.name for l in prune.walk_layers(m.model) if l.trainable and type(l).__name__ in ("Conv2D", "Dense")}
        assert set(sp) == trainable and set(sp) == set(prune.prune_layers(m.model, "trainable"))
        for a, b in zip(prune.walk_layers(m.model), prune.walk_layers(pruned.model)):
            if type(a).__name__ not in ("Conv2D", "Dense"):
                continue
            k = b.kernel.numpy()
            if a.name in trainable:
                assert abs(float(np.mean(k == 0)) - 0.8) < 0.02, a.name
            else:  # frozen: dense and bit-identical to the member's
                assert float(np.mean(k == 0)) == 0.0, a.name
                assert all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights())), a.name
        out.append(pruned)
    # members[0] unfreezes 2 layers (block3_conv1 + pool), members[1] 4: block1 stays frozen in both
    assert "block1_conv1" not in prune.prune_layers(members[1].model, "trainable")
    assert "block2_conv1" in prune.prune_layers(members[1].model, "trainable")
    assert "block2_conv1" not in prune.prune_layers(members[0].model, "trainable")
    assert tflite.shared_cut(out) == tflite.shared_cut(members) == "block1_pool"
    assert tflite.shared_cut([members[0], out[0]]) == "block2_pool"  # the float member's own trunk is shared
    assert models.get_backbone(out[0].model).get_layer("block1_conv1").trainable is False
    with pytest.raises(tflite.CompressError, match="prune_scope must be one of"):
        prune.prune_layers(members[0].model, "frozen")


def test_what_counts_as_prunable_is_what_tfmot_prunes():
    """TFMOT registers DepthwiseConv2D with no weight to prune (EfficientNet-Lite and MobileNetV2 are mostly
    depthwise): pruned with every layer compress calls prunable, each reaches the target and the depthwise one is
    neither pruned nor counted (counting it would fail the sparsity check: it holds almost no zeros)."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    inp = L.Input((8, 8, 3))
    h = L.Conv2D(8, 3, padding="same", name="conv")(inp)
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.SeparableConv2D(8, 3, padding="same", name="sep")(h)
    out = L.Dense(4, name="dense")(L.GlobalAveragePooling2D()(h))
    model = tf.keras.Model(inp, out)
    names = set(prune.prune_layers(model, "all"))
    assert names == {"conv", "sep", "dense"}
    wrapped = prune.wrap_for_pruning(model, names, tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=1))
    wrapped.compile("sgd", "sparse_categorical_crossentropy")
    x, y = np.random.default_rng(0).random((16, 8, 8, 3), np.float32), np.arange(16) % 4
    wrapped.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    sparsity = prune.measure_sparsity(stripped)
    assert set(sparsity) == names and all(abs(v - 0.5) < 0.02 for v in sparsity.values()), sparsity
    assert float(np.mean(stripped.get_layer("dw").depthwise_kernel.numpy() == 0)) == 0.0


def _logits(model, x):
    import tensorflow as tf

    return tf.keras.Model(model.input, model.get_layer("head_logits").output).predict(x, verbose=0)


def test_schedule_that_prunes_nothing_fails(setup):
    import tensorflow_model_optimization as tfmot

    d, members, x_tr, _ = setup
    never = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=10_000, end_step=20_000, frequency=100)
    with pytest.raises(prune.PruningError, match="did not reach the target sparsity 0.5"):
        prune.prune_member(members[0], x_tr[:64], d.y_train[:64], sparsity=0.5, schedule_obj=never)
    with pytest.raises(tflite.CompressError, match="prune_frequency = 50 leaves no mask update"):
        prune.make_schedule("polynomial", 0.5, steps=22, frequency=50)
    with pytest.raises(prune.PruningError, match="no prunable layers"):
        prune.check_sparsity({}, 0.5, 0.02)


def test_shared_cut_is_checked_on_weights(setup):
    _, members, _, _ = setup
    assert [m.spec["cut_layer"] for m in members] == ["block2_pool", "block1_pool"]
    assert tflite.shared_cut(members) == "block1_pool"  # the lower of the two cuts
    from transfuse.finetune import models

    other = KerasMember("changed", models.build_model({**members[0].spec, "seed": None},
                                                          backbone=_clone_backbone(members[0].model)),
                            members[0].spec)
    w = models.get_backbone(other.model).get_layer("block1_conv1").get_weights()
    models.get_backbone(other.model).get_layer("block1_conv1").set_weights([w[0] + 1e-3, w[1]])
    assert tflite.shared_cut([members[0], other]) is None  # block1_conv1 differs: nothing is shared
    assert tflite.shared_cut([members[0], members[0]]) == "block2_pool"


def _clone_backbone(model):
    import tensorflow as tf

    from transfuse.finetune import models

    net = models.get_backbone(model)
    c = tf.keras.models.clone_model(net)
    c.set_weights(net.get_weights())
    c._name = "backbone"
    return c


@pytest.fixture(scope="module")
def int8_bundle(setup, tmp_path_factory):
    d, members, _, rep = setup
    ex = tflite.export_members(members, "int8", rep)
    path = tmp_path_factory.mktemp("int8") / "b"
    compress.write_variant(str(path), ex, members, fitted.EnsembleParts(), name="q", version="1",
                           class_names=CLASS_NAMES, input_shape=(8, 8, 1), num_threads=2)
    return path


def _bundle(tmp_path, name, members, ex):
    compress.write_variant(str(tmp_path / name), ex, members, fitted.EnsembleParts(), name=name, version="1",
                           class_names=CLASS_NAMES, input_shape=(8, 8, 1))
    return load_bundle(tmp_path / name)


def test_shared_trunk_equals_members_run_separately(setup, tmp_path, int8_bundle):
    d, members, _, rep = setup
    x = preprocess(d.x_test, SPEC)
    keras = {m.name: m.model.predict(x, verbose=0) for m in members}
    ex = tflite.export_members(members, "float32")
    assert ex.trunk is not None and ex.cut_layer == "block1_pool"
    shared = _bundle(tmp_path, "f", members, ex).member_probs(d.x_test)
    separate = _bundle(tmp_path, "fs", members, tflite.export_members(members, "float32", share_trunk=False))
    assert separate.manifest["trunk"] is None
    separate = separate.member_probs(d.x_test)
    for name, p in keras.items():
        np.testing.assert_allclose(shared[name], p, atol=1e-4)
        np.testing.assert_allclose(separate[name], p, atol=1e-4)
    # int8: the shared-trunk graph against each member quantized and run whole, on its own
    q = load_bundle(int8_bundle).member_probs(d.x_test)
    q_sep = _bundle(tmp_path, "qs", members, tflite.export_members(members, "int8", rep, share_trunk=False))
    q_sep = q_sep.member_probs(d.x_test)
    for name, p in keras.items():
        agree = float(np.mean(q[name].argmax(1) == q_sep[name].argmax(1)))
        assert agree >= 0.99, (name, agree)
        # quantization error itself (int8 vs float32 Keras): 8-filter layers here quantize coarsely, so a looser bound
        assert float(np.mean(q[name].argmax(1) == p.argmax(1))) >= 0.95


def test_members_merged_into_one_graph_equal_members_run_separately(setup, tmp_path, int8_bundle):
    """compress.merge_members: one multi-output graph (trunk once inside) in one file that both members read; the
    same outputs as the Keras members (float) and the same top-1 as the split int8 export on >= 99%."""
    d, members, _, rep = setup
    x = preprocess(d.x_test, SPEC)
    ex = tflite.export_members(members, "float32", merge=True)
    assert ex.merged is not None and not ex.tops and ex.trunk is None and ex.cut_layer == "block1_pool"
    b = _bundle(tmp_path, "fm", members, ex)
    assert b.manifest["trunk"] is None and {e["file"] for e in b.manifest["cnn_members"]} == {"members/00_merged.tflite"}
    assert len({id(r) for _, r in b._cnn}) == 1  # one interpreter for both members
    merged = b.member_probs(d.x_test)
    for m in members:
        np.testing.assert_allclose(merged[m.name], m.model.predict(x, verbose=0), atol=1e-4)
    q = _bundle(tmp_path, "qm", members, tflite.export_members(members, "int8", rep, merge=True)).member_probs(d.x_test)
    q_split = load_bundle(int8_bundle).member_probs(d.x_test)
    for m in members:
        assert float(np.mean(q[m.name].argmax(1) == q_split[m.name].argmax(1))) >= 0.99
    # the breakdown counts the shared file once
    rows = measure.component_breakdown(str(tmp_path / "fm"), d.x_test, runs=3)
    total = next(r for r in rows if r["component"] == "predict_proba (total)")
    assert total["bytes"] == measure.model_bytes(str(tmp_path / "fm"))[0]


@pytest.mark.parametrize("mode", ["float16", "dynamic_int8"])
def test_quantized_variant_loads_and_predicts(setup, tmp_path, mode):
    d, members, _, rep = setup
    ex = tflite.export_members(members, mode, rep)
    compress.write_variant(str(tmp_path / mode), ex, members, fitted.EnsembleParts(), name=mode, version="1",
                           class_names=CLASS_NAMES, input_shape=(8, 8, 1))
    b = load_bundle(tmp_path / mode)
    p = b.predict_proba(d.x_test)
    ref = np.mean([m.model.predict(preprocess(d.x_test, SPEC), verbose=0) for m in members], axis=0)
    assert p.shape == (len(d.x_test), 10) and np.allclose(p.sum(1), 1.0, atol=1e-5)
    assert np.mean(p.argmax(1) == ref.argmax(1)) >= 0.98


def test_int8_is_integer_inside(int8_bundle):
    """Full-integer int8: the top's weights are stored as int8 tensors, not float32."""
    from ai_edge_litert.interpreter import Interpreter

    f = next((int8_bundle / "members").glob("*.tflite"))
    it = Interpreter(model_path=str(f))
    dtypes = {t["dtype"].__name__ for t in it.get_tensor_details()}
    assert "int8" in dtypes


def test_variant_rows_and_goals(setup, tmp_path, int8_bundle):
    d, members, _, _ = setup
    ex = tflite.export_members(members, "float32")
    compress.write_variant(str(tmp_path / "f"), ex, members, fitted.EnsembleParts(), name="f", version="1",
                           class_names=CLASS_NAMES, input_shape=(8, 8, 1))
    rows = [measure.variant_row(str(p), d.x_test, d.y_test, latency_runs=5, throughput_runs=2)
            for p in (tmp_path / "f", int8_bundle)]
    rows = measure.with_ratios(rows)
    f32, q = rows
    assert f32["variant"] == "float32" and q["variant"] == "int8"
    assert q["size_bytes"] * 2.5 < f32["size_bytes"]  # int8 weights: ~4x fewer bytes than float32
    assert abs(q["accuracy"] - f32["accuracy"]) < 0.05
    g = measure.goals(rows, GoalsConfig())  # judged by the config's goals, not fixed ones
    assert (g["faster_goal"], g["smaller_goal"], g["accuracy_goal_points"]) == (3.0, 4.0, -0.5)
    assert g["smaller_raw"] == q["smaller_raw"] and g["smaller"] == (q["smaller_raw"] >= 4.0)
    lo, hi = (measure.goals(rows, GoalsConfig(served_smaller=q["smaller_raw"] * f)) for f in (0.9, 1.1))
    assert lo["smaller"] and not hi["smaller"]
    assert "smaller stored (goal" in measure.goals_line(hi) and "NOT met" in measure.goals_line(hi)
    text = measure.format_table(rows)
    assert "float32" in text and "int8" in text
    lat = measure.blocked_latency({"f": str(tmp_path / "f"), "q": str(int8_bundle)}, d.x_test, runs=6, blocks=2,
                                  warmup=2)
    assert set(lat) == {"f", "q"} and all(0 < v["p50_ms_b1"] <= v["p99_ms_b1"] for v in lat.values())
    # where the batch-1 time and the bytes go, part by part
    parts = measure.component_breakdown(str(int8_bundle), d.x_test, runs=5)
    names = [r["component"] for r in parts]
    assert names == ["preprocess", "trunk", "cnn cnn0", "cnn cnn1", "combiner (average)", "predict_proba (total)",
                     "glue (total - parts)"]
    total = parts[names.index("predict_proba (total)")]
    assert total["bytes"] == measure.model_bytes(str(int8_bundle))[0]
    assert all(r["p50_ms_b1"] > 0 for r in parts[:-1])
    assert sum(r["p50_ms_b1"] for r in parts[:-2]) + parts[-1]["p50_ms_b1"] == pytest.approx(total["p50_ms_b1"])
    assert "trunk" in measure.format_breakdown(parts)


def test_compress_job_writes_variants_and_bundle(digits_run, tmp_path):
    """jobs.compress end to end on prepared digits: members from tune/members.json (plain averaging)."""
    from transfuse import storage
    from transfuse.finetune import models
    from transfuse.config import ModelConfig
    from transfuse.data import data_manifest

    cfg = digits_run.model_copy(deep=True)
    cfg.run = "compress_job"
    import shutil

    shutil.copytree(PREPARE.dir(digits_run), PREPARE.dir(cfg))
    dm = data_manifest(PREPARE.dir(cfg))
    mc = ModelConfig(**{**cfg.model.model_dump(), "unfreeze": 4})
    tune_dir = TUNE.dir(cfg)
    entries = []
    for i, k in enumerate((4, 8)):
        spec = models.model_spec(mc, len(dm["class_names"]), dm["class_names"], seed=0, unfreeze=k)
        models.save_member(models.build_model(spec), spec, storage.join(tune_dir, f"m{i}"))
        entries.append({"name": f"m{i}", "dir": f"m{i}", "config": {}, "val_accuracy": 0.0})
    storage.write_json(storage.join(tune_dir, "members.json"), {"members": entries})
    from jobs.compress import _run

    cfg.compress = cfg.compress.model_copy(update={
        "variants": ["float32", "pruned", "pruned_int8"], "sparsity": [0.5, 0.8],
        "serve_variant": "pruned80_int8", "latency_runs": 5, "throughput_runs": 1, "prune_frequency": 1})
    m = compress.run_compress(cfg)
    names = ["float32", "pruned50", "pruned80", "pruned50_int8", "pruned80_int8"]
    assert m["variants"] == names and m["serve_variant"] == "pruned80_int8"
    report = storage.read_json(COMPRESS.metrics_path(cfg))
    assert [r["variant"] for r in report["variants"]] == names
    assert all(r["latency"] == "blocked" and r["p50_ms_b1"] > 0 for r in report["variants"])
    assert report["ensemble_source"] == "members" and report["shared_trunk"]["pruned50_int8"] == "block3_pool"
    # every sparsity is pruned and measured on exactly the fine-tuned layers (unfreeze 4 / 8 of vgg_small)
    assert set(report["pruning"]) == {"pruned50", "pruned80"}
    for name, target in (("pruned50", 0.5), ("pruned80", 0.8)):
        for member, p in report["pruning"][name].items():
            assert p["target"] == target and p["scope"] == "trainable" and p["distill"] is True
            assert 0.0 <= p["train_agreement_with_float"] <= 1.0
            assert all(abs(v - target) <= cfg.compress.sparsity_tolerance for v in p["layers"].values()), p
            assert "block1_conv1" not in p["layers"]  # frozen: left dense
        # the frozen trunk stays shared by the pruned members (it is the float members' trunk)
        assert report["shared_trunk"][name] == report["shared_trunk"]["float32"]
        assert load_bundle(storage.join(COMPRESS.dir(cfg), name)).manifest["variant"] == name
    assert report["goals_pruned_int8"]["variant"] == "pruned50_int8"
    assert set(report["goals_by_variant"]) == set(names) - {"float32"}
    b = load_bundle(BUNDLE.dir(cfg))
    assert b.manifest["variant"] == "pruned80_int8" and b.class_names == dm["class_names"]
    assert b.manifest["metrics"]["variants"][0]["variant"] == "float32"
    # the default stores every model file gzip-coded: fewer bytes stored than the runtimes load, every variant
    assert cfg.compress.coding == "gzip" and all(e["coding"] == "gzip" for e in b.manifest["cnn_members"])
    assert all(r["size_bytes"] < r["size_loaded_bytes"] for r in report["variants"])
    assert all(r["smaller_loaded"] > 1 for r in report["variants"] if r["variant"].endswith("_int8"))
    from transfuse.data import read_split_numpy

    x, _, _ = read_split_numpy(PREPARE.dir(cfg), "test")
    assert b.predict_proba(x[:4]).shape == (4, len(dm["class_names"]))
    assert storage.is_complete(COMPRESS.dir(cfg), m["fingerprint"])
    assert compress.run_compress(cfg)["created"] == m["created"]  # complete: not rerun
    assert _run is not None


def test_variant_names_and_config_errors():
    """Pruned kinds expand once per sparsity; serve_variant must be an exported name, the error lists them."""
    from transfuse.config import CompressConfig, ConfigError, load_config

    c = CompressConfig(sparsity=[0.5, 0.875], variants=["float32", "pruned", "pruned_int8"], serve_variant="float32")
    assert c.variant_names() == ["float32", "pruned50", "pruned87p5", "pruned50_int8", "pruned87p5_int8"]
    assert compress.expand_variants(c.variants, c.sparsity) == c.variant_names()
    assert compress.parse_variant("pruned87p5_int8", c.sparsity) == (0.875, "int8")
    assert compress.parse_variant("dynamic_int8", c.sparsity) == (None, "dynamic_int8")
    with pytest.raises(tflite.CompressError, match=r"'pruned80' is not one of .*'pruned50'"):
        compress.parse_variant("pruned80", c.sparsity)
    with pytest.raises(ConfigError, match=r"serve_variant 'pruned_int8' is not an exported variant; allowed .*"
                                          r"'pruned50_int8'"):
        load_config(None, ["compress.serve_variant=pruned_int8"])
    with pytest.raises(ConfigError, match="sparsity values must be distinct"):
        load_config(None, ["compress.sparsity=[0.5,0.5]"])
    assert load_config(None, ["compress.sparsity=[0.5,0.8]", "compress.serve_variant=pruned80_int8"]) \
        .compress.serve_variant == "pruned80_int8"


def test_read_ensemble_uses_the_ensemble_stage_files(tmp_path):
    """compress reads <run>/ensemble/ as jobs.ensemble writes it: ensemble.json, members/*.onnx, stacker.json."""
    import json

    from sklearn.linear_model import LogisticRegression
    from skl2onnx import to_onnx

    from conftest import smoke_config
    from transfuse import storage
    from transfuse.inference import combine

    cfg = smoke_config(tmp_path)
    ens = ENSEMBLE.dir(cfg)
    rng = np.random.default_rng(0)
    emb, y = rng.normal(size=(60, 8)).astype(np.float32), np.arange(60) % 3
    lr = LogisticRegression(max_iter=200).fit(emb, y)
    storage.write_bytes(storage.join(ens, "members", "lr.onnx"),
                        to_onnx(lr, emb[:1], options={id(lr): {"zipmap": False}}).SerializeToString())
    st = combine.Stacker(members=["a", "b", "lr"], features="log_probs")
    st.fit({"a": np.eye(3)[y], "b": np.eye(3)[y], "lr": lr.predict_proba(emb)}, y)
    storage.write_bytes(storage.join(ens, "stacker.json"), json.dumps(st.to_arrays()).encode())
    storage.write_json(storage.join(ens, "ensemble.json"), {
        "format": "transfuse.ensemble/v1", "member_order": ["a", "b", "lr"],
        "cnn_members": [{"name": "a", "dir": "/x/a"}, {"name": "b", "dir": "/x/b"}],
        "sklearn_members": [{"name": "lr", "file": "members/lr.onnx", "embedding_source": "a",
                             "input": "embedding", "output": "probabilities"},
                            {"name": "px", "file": "members/lr.onnx", "features": "pixels", "pixel_size": 4,
                             "input": "embedding", "output": "probabilities"}],
        "stacker": {"file": "stacker.json", "features": "log_probs"}})
    src = fitted.read_ensemble(cfg)
    assert src.source == "ensemble" and src.members == [("a", "/x/a"), ("b", "/x/b")]
    sk, px = src.parts.sklearn
    assert sk.embedding_of == "a" and sk.probabilities_output == "probabilities" and sk.data[:2] != b""
    assert sk.features == "embedding" and (px.features, px.pixel_size, px.embedding_of) == ("pixels", 4, None)
    assert src.parts.stacker.members == ["a", "b", "lr"] and src.parts.stacker.features == "log_probs"
    np.testing.assert_array_equal(src.parts.stacker.coef_, st.coef_)
    assert src.parts.stacker.eps == st.eps  # the clip before log travels with the stacker


def test_zero_weight_members_are_left_out_losslessly():
    """Members whose stacker columns are all zero are dropped from the bundle's parts; a zero-weight CNN member
    whose embedding a kept member reads stays; the reduced stacker gives the same probabilities."""
    from transfuse.inference.combine import Stacker

    k, names = 3, ["a", "b", "lr", "px", "sv"]
    rng = np.random.default_rng(0)
    coef = rng.normal(size=(k, k * len(names)))
    for dead in ("a", "b", "sv"):
        j = names.index(dead)
        coef[:, j * k:(j + 1) * k] = 0.0
    parts = fitted.EnsembleParts(
        sklearn=[BundleSklearn("lr", b"1", embedding_of="a"), BundleSklearn("px", b"2", features="pixels"),
                 BundleSklearn("sv", b"3", embedding_of="b")],
        stacker=Stacker(names, coef_=coef, intercept_=rng.normal(size=k)))
    src = fitted.EnsembleSource([("a", "/a"), ("b", "/b")], parts, "ensemble", "f")
    out, info = fitted.drop_zero_weight_members(src)
    assert out.members == [("a", "/a")] and [s.name for s in out.parts.sklearn] == ["lr", "px"]
    assert info["dropped"] == ["b", "sv"] and info["kept_at_zero_weight"] == ["a"]
    assert out.parts.stacker.members == ["a", "lr", "px"] and out.parts.stacker.coef_.shape == (k, 3 * k)
    probs = {m: rng.dirichlet(np.ones(k), size=20) for m in names}
    np.testing.assert_allclose(out.parts.stacker.predict_proba(probs), parts.stacker.predict_proba(probs), atol=1e-12)
    # nothing at zero: nothing dropped; no stacker (plain averaging): nothing dropped
    live = fitted.EnsembleSource(src.members, fitted.EnsembleParts(parts.sklearn, Stacker(
        names, coef_=rng.normal(size=(k, k * len(names))), intercept_=np.zeros(k))), "ensemble", "f")
    assert fitted.drop_zero_weight_members(live)[1]["dropped"] == []
    avg = fitted.EnsembleSource(src.members, fitted.EnsembleParts(), "members", "f")
    assert fitted.drop_zero_weight_members(avg)[0] is avg


def test_sklearn_onnx_rewrites_are_lossless(setup):
    """AdaBoost (SAMME) becomes one tree ensemble and tree classifiers lose their zero leaf entries; outputs equal
    scikit-learn's and the original graph's on embeddings the rewrite never saw."""
    import onnx
    from sklearn.ensemble import AdaBoostClassifier, RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier
    from skl2onnx import to_onnx

    from transfuse.finetune import models

    d, members, x_tr, _ = setup
    emb_net = models.embedding_model(members[0].model)
    e_tr = emb_net.predict(x_tr[:600], verbose=0)
    e_te = emb_net.predict(preprocess(d.x_test, SPEC), verbose=0)
    y = d.y_train[:600]
    for est in (AdaBoostClassifier(DecisionTreeClassifier(max_depth=1), n_estimators=30, random_state=0),
                RandomForestClassifier(n_estimators=8, random_state=0)):
        est.fit(e_tr, y)
        data = to_onnx(est, e_tr[:1], options={id(est): {"zipmap": False}}).SerializeToString()
        new, info = onnx_rewrite.optimize_sklearn_onnx(data, e_tr[:200])
        assert info["applied"] and len(new) < len(data), info
        old_out, new_out = onnx_rewrite.run_onnx(data, e_te), onnx_rewrite.run_onnx(new, e_te)
        np.testing.assert_allclose(new_out["probabilities"], old_out["probabilities"], atol=1e-5)
        np.testing.assert_array_equal(new_out["label"], old_out["label"])
        np.testing.assert_allclose(new_out["probabilities"], est.predict_proba(e_te), atol=1e-4)
        if isinstance(est, AdaBoostClassifier):
            g = onnx.load_from_string(new).graph
            assert [n.op_type for n in g.node].count("TreeEnsembleRegressor") == 1
            assert not any(n.op_type == "TreeEnsembleClassifier" for n in g.node)
            assert len(g.node) < 20 < len(onnx.load_from_string(data).graph.node)
    # a graph with nothing to rewrite comes back as it was
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(max_iter=300).fit(e_tr, y)
    data = to_onnx(lr, e_tr[:1], options={id(lr): {"zipmap": False}}).SerializeToString()
    assert onnx_rewrite.optimize_sklearn_onnx(data, e_tr[:50]) == (data, {"bytes_before": len(data), "applied": [],
                                                                     "bytes_after": len(data)})
