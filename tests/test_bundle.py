"""The bundle: write -> verified load -> predict equals the float models; tampered, missing, unlisted and
wrong-version bundles are refused with errors naming the file and the problem; http(s) bundles are fetched."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from _compress_helpers import CLASS_NAMES, trained
from transfuse.compress import stage as compress
from transfuse.compress import tflite
from transfuse.ensemble import fitted
from transfuse.inference.bundle import BundleError, BundleInputError, load_bundle
from transfuse.inference.bundle_writer import BundleSklearn, write_bundle
from transfuse.inference.combine import Stacker
from transfuse.inference.preprocessing import PreprocessSpec, pixel_features, preprocess

SPEC = PreprocessSpec(32, "unit")


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Two CNN members (shared trunk), a logistic-regression member on cnn0's embedding and one on the pixels
    (ONNX), and a stacker."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    from transfuse.finetune import models

    d, members = trained()
    x_tr = preprocess(d.x_train, SPEC)
    emb = models.embedding_model(members[0].model).predict(x_tr, verbose=0)
    lr = LogisticRegression(max_iter=500).fit(emb, d.y_train)
    onx = to_onnx(lr, emb[:1].astype(np.float32), options={id(lr): {"zipmap": False}}).SerializeToString()
    pix = pixel_features(d.x_train, 6)  # 8 x 8 digits resized to 6 x 6: 36 inputs
    px = LogisticRegression(C=0.1, max_iter=500).fit(pix, d.y_train)
    px_onx = to_onnx(px, pix[:1], options={id(px): {"zipmap": False}}).SerializeToString()
    probs = [m.model.predict(x_tr, verbose=0) for m in members] + [lr.predict_proba(emb), px.predict_proba(pix)]
    stacker = LogisticRegression(max_iter=500).fit(np.concatenate(probs, axis=1), d.y_train)  # the reference
    parts = fitted.EnsembleParts(
        sklearn=[BundleSklearn("logreg_cnn0", onx, embedding_of="cnn0"),
                 BundleSklearn("px", px_onx, features="pixels", pixel_size=6)],
        stacker=Stacker(["cnn0", "cnn1", "logreg_cnn0", "px"], coef_=stacker.coef_, intercept_=stacker.intercept_))
    exported = tflite.export_members(members, "float32")
    path = tmp_path_factory.mktemp("bundle") / "b"
    compress.write_variant(str(path), exported, members, parts, name="digits", version="7",
                           class_names=CLASS_NAMES, input_shape=(8, 8, 1), num_threads=2)
    return {"path": path, "data": d, "members": members, "lr": lr, "px": px, "stacker": stacker,
            "exported": exported, "parts": parts}


def _reference(ens, images):
    """The float tf_keras + scikit-learn ensemble computed directly (no bundle)."""
    from transfuse.finetune import models

    x = preprocess(images, SPEC)
    m0, m1 = ens["members"]
    emb = models.embedding_model(m0.model).predict(x, verbose=0)
    feats = np.concatenate([m0.model.predict(x, verbose=0), m1.model.predict(x, verbose=0),
                            ens["lr"].predict_proba(emb), ens["px"].predict_proba(pixel_features(images, 6))], axis=1)
    return ens["stacker"].predict_proba(feats)


def _copy(ens, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(ens["path"], dst)
    return dst


def test_round_trip_matches_float_models(ensemble):
    b = load_bundle(ensemble["path"])
    d = ensemble["data"]
    p = b.predict_proba(d.x_test)
    ref = _reference(ensemble, d.x_test)
    assert p.dtype == np.float32 and p.shape == (len(d.x_test), 10)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p, ref, atol=1e-4)
    assert (p.argmax(1) == d.y_test).mean() > 0.5  # a trained ensemble, not chance (0.1)
    assert b.name == "digits" and b.version == "7" and b.class_names == CLASS_NAMES
    assert b.manifest["trunk"] is not None and b.manifest["shared_trunk"]["cut_layer"] == "block1_pool"
    assert b.input_spec["shape"] == [8, 8, 1] and len(b.checksum) == 64
    assert [(e["features"], e.get("pixel_size")) for e in b.manifest["sklearn_members"]] == [
        ("embedding", None), ("pixels", 6)]
    # float [0, 1] images give the same answer as uint8 ones
    np.testing.assert_allclose(b.predict_proba(d.x_test[:5].astype(np.float32) / 255.0), p[:5], atol=1e-5)


def test_plain_average_without_stacker(ensemble, tmp_path):
    ex, members = ensemble["exported"], ensemble["members"]
    compress.write_variant(str(tmp_path / "avg"), ex, members, fitted.EnsembleParts(), name="avg", version="1",
                           class_names=CLASS_NAMES, input_shape=(8, 8, 1))
    b = load_bundle(tmp_path / "avg")
    x = ensemble["data"].x_test[:20]
    ref = np.mean([m.model.predict(preprocess(x, SPEC), verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(b.predict_proba(x), ref, atol=1e-5)
    assert b.manifest["combiner"]["kind"] == "average"


def test_tampered_file_refused(ensemble, tmp_path):
    dst = _copy(ensemble, tmp_path)
    f = dst / "members" / "01_cnn1.tflite"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"members/01_cnn1.tflite.*altered"):
        load_bundle(dst)


def test_missing_file_refused(ensemble, tmp_path):
    dst = _copy(ensemble, tmp_path)
    (dst / "stacker.npz").unlink()
    with pytest.raises(BundleError, match=r"stacker.npz.*missing"):
        load_bundle(dst)
    shutil.rmtree(dst)
    dst = _copy(ensemble, tmp_path)
    (dst / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(dst)


def test_unlisted_file_refused(ensemble, tmp_path):
    dst = _copy(ensemble, tmp_path)
    (dst / "members" / "evil.tflite").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"not listed in the manifest.*members/evil.tflite"):
        load_bundle(dst)


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: m.update(format_version=2), r"format_version 2 is not supported"),
    (lambda m: m.pop("format"), r"not a transfuse bundle"),
    (lambda m: m.pop("class_names"), r"required field 'class_names' is missing"),
    (lambda m: m["files"].pop("trunk.tflite"), r"not listed in the manifest.*trunk.tflite"),
    (lambda m: m["files"].update({"../outside": "0" * 64}), r"relative path inside the bundle"),
    (lambda m: m["combiner"].update(members=["cnn0"]), r"combiner.members"),
    (lambda m: m["cnn_members"][0]["outputs"].update(logits="nope"), r"output 'nope'"),
    (lambda m: m["sklearn_members"][1].update(features="voxels"), r"sklearn member px .*features must be one of"),
    (lambda m: m["sklearn_members"][1].update(pixel_size=-3), r"sklearn member px .*pixel_size must be a positive"),
])
def test_bad_manifest_refused(ensemble, tmp_path, edit, pattern):
    dst = _copy(ensemble, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=pattern):
        load_bundle(dst)


def test_bad_input_refused(ensemble):
    b = load_bundle(ensemble["path"])
    x = ensemble["data"].x_test[:2]
    for bad, pattern in [(x[:, :4], r"shaped N x 8 x 8 x 1"), (x.astype(np.int32), "dtype int32"),
                         (x.astype(np.float32), r"\[0, 1\]"), (x[:0], "at least one"),
                         (np.full((1, 8, 8, 1), np.nan, np.float32), "finite")]:
        with pytest.raises(BundleInputError, match=pattern):
            b.predict_proba(bad)
    assert b.predict_proba(x[..., 0]).shape == (2, 10)  # N x H x W grey images are accepted


def test_write_refuses_non_empty_dir(ensemble, tmp_path):
    ex, members = ensemble["exported"], ensemble["members"]
    kw = dict(name="x", version="1", class_names=CLASS_NAMES, input_shape=(8, 8, 1))
    compress.write_variant(str(tmp_path / "w"), ex, members, fitted.EnsembleParts(), overwrite=False, **kw)
    with pytest.raises(BundleError, match="not empty"):
        compress.write_variant(str(tmp_path / "w"), ex, members, fitted.EnsembleParts(), overwrite=False, **kw)
    with pytest.raises(BundleError, match="embedding_of must be one of"):
        write_bundle(str(tmp_path / "w2"), preprocess_spec=SPEC, trunk=ex.trunk,
                     cnn_members=[compress.BundleCnn("a", ex.tops["cnn0"])],
                     sklearn_members=[BundleSklearn("s", b"", embedding_of="zzz")], **kw)
    with pytest.raises(BundleError, match=r"features must be one of \('embedding', 'pixels'\), got 'pixel'"):
        write_bundle(str(tmp_path / "w3"), preprocess_spec=SPEC, trunk=ex.trunk,
                     cnn_members=[compress.BundleCnn("a", ex.tops["cnn0"])],
                     sklearn_members=[BundleSklearn("s", b"", features="pixel")], **kw)


def test_http_bundle_is_fetched_and_verified(ensemble, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ensemble["path"]))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        b = load_bundle(url, cache_dir=tmp_path / "cache")
        local = load_bundle(ensemble["path"])
        x = ensemble["data"].x_test[:8]
        np.testing.assert_allclose(b.predict_proba(x), local.predict_proba(x), atol=1e-6)
        assert b.checksum == local.checksum and b.path.parent == tmp_path / "cache"
        with pytest.raises(BundleError, match="cannot fetch"):
            load_bundle(url + "/nowhere", cache_dir=tmp_path / "cache")
    finally:
        srv.shutdown()


def test_gzip_coded_bundle_loads_the_same_models(ensemble, tmp_path):
    """coding="gzip": every model file stored as <file>.gz (gunzip gives the model as written), the same
    predictions as the plain bundle, fewer stored bytes; a checksummed file that is not gzip, an unknown coding
    and a refused coding at write time are errors naming them."""
    import gzip

    from transfuse.compress import measure

    ex, members, parts = ensemble["exported"], ensemble["members"], ensemble["parts"]
    kw = dict(name="digits", version="7", class_names=CLASS_NAMES, input_shape=(8, 8, 1))
    compress.write_variant(str(tmp_path / "plain"), ex, members, parts, **kw)
    compress.write_variant(str(tmp_path / "gz"), ex, members, parts, coding="gzip", **kw)
    plain, coded = load_bundle(tmp_path / "plain"), load_bundle(tmp_path / "gz")
    m = coded.manifest
    entries = [m["trunk"], *m["cnn_members"], *m["sklearn_members"]]
    assert all(e["coding"] == "gzip" and e["file"].endswith(".gz") for e in entries)
    for e, p in zip(entries, [plain.manifest["trunk"], *plain.manifest["cnn_members"],
                              *plain.manifest["sklearn_members"]]):
        stored = (tmp_path / "gz" / e["file"]).read_bytes()
        assert gzip.decompress(stored) == (tmp_path / "plain" / p["file"]).read_bytes()
    x = ensemble["data"].x_test
    np.testing.assert_array_equal(coded.predict_proba(x), plain.predict_proba(x))
    stored, _, loaded = measure.model_bytes(str(tmp_path / "gz"))
    assert loaded == measure.model_bytes(str(tmp_path / "plain"))[0] and stored < loaded

    def edit(fn):
        dst = tmp_path / "edited"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(tmp_path / "gz", dst)
        man = json.loads((dst / "manifest.json").read_text())
        fn(dst, man)
        (dst / "manifest.json").write_text(json.dumps(man))
        return dst

    def not_gzip(dst, man):  # checksum right, content not gzip: the decode step must say so
        import hashlib

        rel = man["trunk"]["file"]
        (dst / rel).write_bytes(b"plain bytes")
        man["files"][rel] = hashlib.sha256(b"plain bytes").hexdigest()

    with pytest.raises(BundleError, match=r"trunk .*trunk.tflite.gz is not valid gzip data"):
        load_bundle(edit(not_gzip))
    with pytest.raises(BundleError, match=r"coding must be one of \('none', 'gzip'\), got 'zstd'"):
        load_bundle(edit(lambda dst, man: man["sklearn_members"][0].update(coding="zstd")))
    with pytest.raises(BundleError, match=r"coding must be one of \('none', 'gzip'\), got 'zip'"):
        compress.write_variant(str(tmp_path / "bad"), ex, members, parts, coding="zip", **kw)
