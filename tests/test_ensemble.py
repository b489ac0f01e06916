"""Ensemble tests on scikit-learn's digits: member validation, Ray-parallel fitting and what each model saw, the
combiners chosen by the ensemble fit against its members, ONNX round trips of every member kind, and the ensemble
stage end to end on member directories written from real fitted models. The combiners themselves (stacker,
temperature, greedy selection, voting, the leakage check) are tested in test_stacking.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests._ensemble_helpers import digits_splits, subset_members, write_member_dir, write_member_run
from transfuse import metrics as tm
from transfuse import storage
from transfuse.config import ConfigError, EnsembleConfig, MemberConfig, load_config
from transfuse.data import PREPARE
from transfuse.ensemble import ENSEMBLE
from transfuse.ensemble.inputs import EnsembleInputs
from transfuse.ensemble.learners import (FitTask, LocalRunner, MemberError, RayRunner, build_estimator, fit_one,
                                         to_onnx_bytes, validate_members)
from transfuse.ensemble.stage import fit_ensemble, load_saved_members, run_ensemble
from transfuse.finetune import TUNE
from transfuse.finetune.predictions import read_member_split
from transfuse.inference.combine import EnsembleError, load_sklearn_member

ROOT = Path(__file__).resolve().parent.parent
KINDS = {  # small settings: the machine is shared
    "random_forest": {"n_estimators": 20},
    "bagging": {"n_estimators": 5},
    "adaboost": {"n_estimators": 20},
    "hist_gradient_boosting": {"max_iter": 10},
    "svc": {"C": 1.0},
    "logistic_regression": {"C": 1.0, "max_iter": 300},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """OpenMP/BLAS in this process capped at one thread: HistGradientBoosting's OpenMP barriers spin for a long time
    when every core is busy with other work (the member tasks cap themselves the same way)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def digits():
    """Digits train/holdout/test splits (tests._ensemble_helpers.digits_splits)."""
    return digits_splits()


def _inputs(digits, cnn_probs=None, cnn_fit_ids=None, columns=None) -> EnsembleInputs:
    cols = slice(None) if columns is None else columns
    return EnsembleInputs(
        ids={s: v[2] for s, v in digits.items()}, labels={s: v[1] for s, v in digits.items()},
        embeddings={s: v[0][:, cols] for s, v in digits.items()}, num_classes=10,
        cnn_probs=cnn_probs or {}, cnn_fit_ids=cnn_fit_ids or {})


def _members(*names: str) -> list[MemberConfig]:
    return [MemberConfig(name=n, kind=n, params=KINDS[n]) for n in names]


# ----------------------------------------------------------------------------------------------------------------
# Member configuration


def test_every_kind_builds_fits_and_follows_the_estimator_api(digits):
    from sklearn.base import clone

    x, y, _ = digits["train"]
    for kind, params in KINDS.items():
        est = build_estimator(MemberConfig(name=f"m_{kind}", kind=kind, params=params), seed=3)
        assert clone(est).get_params()["random_state"] == 3 if "random_state" in est.get_params() else True
        p = est.fit(x, y).predict_proba(x[:5])
        assert p.shape == (5, 10) and np.allclose(p.sum(1), 1.0, atol=1e-6), kind
    ada = build_estimator(MemberConfig(name="a", kind="adaboost", params={"estimator__max_depth": 2}))
    assert ada.estimator.max_depth == 2  # nested parameters reach the base tree (estimator=, not base_estimator=)


BAD_MEMBERS = [
    # (ensemble.members override, exception, message pattern)
    ("[{name: x, kind: xgboost}]", ConfigError, r"member 'x': unknown kind 'xgboost'; allowed: random_forest, "),
    ("[{name: a/b, kind: svc}]", ConfigError, r"member name must be .* got 'a/b'"),
    ("[{name: a, kind: svc}, {name: a, kind: random_forest}]", ConfigError, r"member names must be unique"),
    ("[{name: rf, kind: random_forest, params: {n_trees: 10}}]", MemberError,
     r"member 'rf' \(random_forest, RandomForestClassifier\): unknown parameter 'n_trees'; allowed: .*n_estimators"),
    ("[{name: rf, kind: random_forest, params: {n_estimators: 0}}]", MemberError,
     r"member 'rf' \(random_forest.*'n_estimators' parameter of RandomForestClassifier must be an int in the "
     r"range \[1, inf\)\. Got 0"),
    ("[{name: s, kind: svc, params: {kernel: cubic}}]", MemberError,
     r"member 's' \(svc, SVC\): .*'kernel'.*Got 'cubic'"),
    ("[{name: s, kind: svc, params: {probability: false}}]", MemberError,
     r"member 's'.*'probability' cannot be set in config: svc members always use probability=True"),
    ("[{name: r, kind: random_forest, params: {random_state: 1}}]", MemberError,
     r"'random_state' cannot be set in config: it is set from ensemble.seeds"),
    ("[{name: a, kind: adaboost, params: {estimator__max_depth: deep}}]", MemberError,
     r"member 'a' \(adaboost.*'max_depth' parameter of DecisionTreeClassifier .*Got 'deep'"),
    ("[{name: a, kind: adaboost, params: {base_estimator: stump}}]", MemberError,
     r"unknown parameter 'base_estimator'; allowed: .*estimator__max_depth"),
]


@pytest.mark.parametrize("members, exc, pattern", BAD_MEMBERS)
def test_bad_member_config_fails_with_a_clear_error(members, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cfg = load_config(None, [f"ensemble.members={members}"])
        validate_members(cfg.ensemble)


def test_fit_time_error_is_rewrapped_with_the_member_name(digits):
    """A value scikit-learn accepts at construction but refuses at fit time still names the member."""
    data = {"x": digits["train"][0], "y": digits["train"][1], "ids": digits["train"][2]}
    member = MemberConfig(name="hgb", kind="hist_gradient_boosting", params={"categorical_features": [500]})
    task = FitTask(member, 0, None, np.arange(50), {}, 10)
    with pytest.raises(MemberError, match=r"member 'hgb' \(hist_gradient_boosting\) failed to fit hgb/seed0/final"):
        fit_one(data, task)


# ----------------------------------------------------------------------------------------------------------------
# Fitting on Ray, and what each model saw


@pytest.fixture(scope="module")
def ray_fit(ray_cluster, digits):
    """Two members, 3 folds, 2 seeds, fitted as Ray tasks; plus complementary prob-only members."""
    cnn, seen = subset_members(digits)
    ecfg = EnsembleConfig(members=_members("logistic_regression", "random_forest"), folds=3, seeds=[0, 1],
                          parallel="ray", cpus_per_task=1.0)
    inp = _inputs(digits, cnn, seen)
    calls: list[tuple[int, int]] = []
    fit = fit_ensemble(inp, ecfg, RayRunner(num_cpus=1.0), progress=lambda done, total: calls.append((done, total)))
    return inp, ecfg, fit, calls


def test_members_fit_in_parallel_on_ray_from_one_shared_object(ray_fit):
    inp, ecfg, fit, calls = ray_fit
    assert fit.runner == "ray"
    assert calls == [(i, 16) for i in range(1, 17)]  # progress as each of the 16 tasks finished
    # 2 seeds x 2 members x (3 folds + 1 final) tasks, all reading the same object-store entry (put once)
    assert len(fit.data_object_ids) == 16 and len(set(fit.data_object_ids)) == 1
    assert fit.data_object_ids[0] is not None
    # the local path with the same interface gives the same member predictions
    local_calls: list[tuple[int, int]] = []
    local = fit_ensemble(inp, ecfg.model_copy(update={"parallel": "local", "seeds": [0]}), LocalRunner(),
                         progress=lambda done, total: local_calls.append((done, total)))
    assert local_calls == [(i, 8) for i in range(1, 9)]
    for m in ("logistic_regression", "random_forest"):
        np.testing.assert_allclose(local.first.test_probs[m], fit.first.test_probs[m], atol=1e-12)
        np.testing.assert_allclose(local.first.holdout_probs[m], fit.first.holdout_probs[m], atol=1e-12)


def test_no_model_saw_the_examples_it_predicted_for_the_stacker(ray_fit, digits):
    inp, _, fit, _ = ray_fit
    holdout, test, train = (set(digits[s][2]) for s in ("holdout", "test", "train"))
    for s in fit.seeds:
        assert set(s.stacker.fit_ids_) == holdout and set(s.greedy.fit_ids_) == holdout
        assert not set(s.stacker.fit_ids_) & (train | test)
        for m in ("logistic_regression", "random_forest"):
            folds = [r for r in s.records if r.member == m]
            assert len(folds) == 3
            covered = set()
            for r in folds:  # each fold model fitted on train + the other holdout folds, predicted its own fold
                fit_ids, pred = set(r.fit_ids), set(r.predicted_ids)
                assert not fit_ids & pred and train <= fit_ids and not fit_ids & test
                covered |= pred
            assert covered == holdout
            (final,) = [r for r in s.final_records if r.member == m]
            assert set(final.fit_ids) == train | holdout and not set(final.fit_ids) & test
        for m in inp.cnn_probs:  # prob-only members were trained on train only
            (r,) = [r for r in s.records if r.member == m]
            assert set(r.fit_ids) == train and set(r.predicted_ids) == holdout
        assert s.leakage["leaks"] == 0


# ----------------------------------------------------------------------------------------------------------------
# Combiners


def test_stack_is_at_least_as_good_as_the_best_complementary_member(digits):
    """Members that each see different pixel rows are weak alone and complementary together."""
    cnn, seen = subset_members(digits)
    fit = fit_ensemble(_inputs(digits, cnn, seen), EnsembleConfig(members=[], seeds=[0], parallel="local"),
                       LocalRunner())
    m = fit.first.metrics
    best_acc = max(m[k]["accuracy"] for k in cnn)
    best_nll = min(m[k]["nll"] for k in cnn)
    assert m["stack"]["accuracy"] >= best_acc and m["stack"]["nll"] <= best_nll
    assert m["greedy"]["nll"] <= best_nll  # greedy can always fall back to the single best member
    for c in ("average", "hard_vote", "greedy", "stack"):
        assert set(m[c]) == {"accuracy", "nll", "ece", "n", "balanced_accuracy", "macro_f1", "per_class_recall"}
        assert m[c]["n"] == len(digits["test"][1]) and list(m[c]["per_class_recall"]) == [str(i) for i in range(10)]


# ----------------------------------------------------------------------------------------------------------------
# Saving without pickle


@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_member_matches_sklearn(digits, kind):
    x, y, _ = digits["train"]
    est = build_estimator(MemberConfig(name="m", kind=kind, params=KINDS[kind]), seed=0).fit(x, y)
    member = load_sklearn_member(to_onnx_bytes(est, x.shape[1], kind))
    xt = digits["test"][0]
    got, want = member(xt), est.predict_proba(xt)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.995  # float32 ties may flip the odd argmax


def test_hist_gradient_boosting_onnx_is_exact_on_pixels(fashion_dir):
    """A searched HistGradientBoosting member on Fashion-MNIST pixels (the ensemble stage failed its reload check
    on it): rounding the float64 thresholds to the nearest float32 moved 20 of 2,000 rows by up to 0.157; with
    ``float32_exact_thresholds`` the ONNX graph matches scikit-learn, whose own predictions do not move."""
    from transfuse.data.sources import read_idx
    from transfuse.ensemble.learners import float32_exact_thresholds
    from transfuse.inference.preprocessing import pixel_features

    x = pixel_features(read_idx(str(fashion_dir / "train-images-idx3-ubyte.gz"))[:2150])
    y = read_idx(str(fashion_dir / "train-labels-idx1-ubyte.gz"))[:2150].astype(np.int64)
    params = {"max_iter": 287, "learning_rate": 0.0125, "l2_regularization": 1.85e-4, "max_leaf_nodes": 15}
    est = build_estimator(MemberConfig(name="hgb_px", kind="hist_gradient_boosting", params=params), seed=0)
    est.fit(x[:150], y[:150])
    before = est.predict_proba(x[150:])
    for predictors in est._predictors:  # as a model that came back from a Ray task (the object store's arrays)
        for predictor in predictors:
            predictor.nodes.flags.writeable = False
    float32_exact_thresholds(est)
    np.testing.assert_array_equal(est.predict_proba(x[150:]), before)
    got = load_sklearn_member(to_onnx_bytes(est, x.shape[1], "hgb_px"))(x[150:])
    np.testing.assert_allclose(got, before, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The ensemble stage on member directories in the real formats


@pytest.fixture(scope="module")
def member_run(digits_run, tmp_path_factory):
    """Two fine-tuned members in a run of their own (tests._ensemble_helpers.write_member_run)."""
    return write_member_run(digits_run, tmp_path_factory.mktemp("ens"), "ens")


def test_ensemble_stage_end_to_end(member_run):
    cfg, splits = member_run
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"storage={cfg.storage}", f"run={cfg.run}", "ensemble.folds=3", "ensemble.seeds=[0, 1]",
        "ensemble.members=[{name: rf, kind: random_forest, params: {n_estimators: 20}},"
        " {name: logreg, kind: logistic_regression, params: {max_iter: 300}}]"])
    manifest = run_ensemble(cfg, force=True)
    out = Path(ENSEMBLE.dir(cfg))
    desc = json.loads((out / "ensemble.json").read_text())
    assert desc["member_order"] == ["trial_a", "trial_b", "rf", "logreg"]
    assert [m["file"] for m in desc["sklearn_members"]] == ["members/rf.onnx", "members/logreg.onnx"]
    assert desc["embedding_source"]["name"] in ("trial_a", "trial_b")
    for rel, digest in manifest["files"].items():  # every file checksummed; no pickles anywhere
        assert storage.sha256(str(out / rel)) == digest and not rel.endswith((".pkl", ".pickle", ".joblib"))
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["summary"]) == {"trial_a", "trial_b", "rf", "logreg", "average", "hard_vote", "greedy",
                                      "stack"}
    assert report["summary"]["stack"]["accuracy"]["values"].__len__() == 2
    assert np.asarray(report["confusion_stack"]).sum() == len(splits["test"][1])
    assert max(report["reload_max_abs_diff"].values()) < 1e-3
    # the balanced digits leave data.class_weight auto off: nothing weighted, the decision recorded
    assert report["class_weight"]["on"] is False and report["class_weight"]["mode"] == "auto"
    assert manifest["class_weight"] == report["class_weight"] and desc["stacker"]["class_weighted"] is False
    # temperature scaling (on by default): fitted per seed, folded into the saved stacker, accuracy unchanged
    cal = report["calibration"]["0"]
    assert cal["temperature"] == desc["stacker"]["temperature"] == \
        json.loads((out / "stacker.json").read_text())["temperature"]
    assert cal["test"]["before"]["accuracy"] == cal["test"]["after"]["accuracy"] == \
        report["test"]["0"]["stack"]["accuracy"]
    assert cal["holdout_oof"]["after"]["nll"] <= cal["holdout_oof"]["before"]["nll"]
    for split, key in (("test", "after"), ("test_uncalibrated", "before")):  # what the report's diagram reads
        ids, labels, probs = read_member_split(str(out), "predictions", split)
        assert sorted(ids) == sorted(splits["test"][2])
        assert tm.nll(probs, labels) == pytest.approx(cal["test"][key]["nll"], rel=1e-5)
    records = json.loads((out / "fit_records.json").read_text())
    assert set(records["stacker_fit_ids"]) == set(splits["holdout"][2])
    # the saved parts reload with numpy + onnxruntime and give the stack's test predictions
    sk, stacker, _, _ = load_saved_members(str(out))
    probs = {m: pq.read_table(Path(TUNE.dir(cfg)) / "trials" / m / "predictions" /
                              "test.parquet").sort_by("id") for m in ("trial_a", "trial_b")}
    probs = {m: np.asarray(t.column("probs").to_pylist()) for m, t in probs.items()}
    emb = pq.read_table(Path(desc["embedding_source"]["dir"]) / "embeddings" / "test.parquet").sort_by("id")
    x = np.asarray(emb.column("embedding").to_pylist(), dtype=np.float32)
    probs.update({n: m(x) for n, m in sk.items()})
    acc = tm.accuracy(stacker.predict_proba(probs), splits["test"][1][np.argsort(splits["test"][2])])
    assert abs(acc - report["test"]["0"]["stack"]["accuracy"]) < 1e-9
    # complete for the same inputs: not refitted
    assert run_ensemble(cfg)["created"] == manifest["created"]


def test_a_temperature_is_served_only_where_its_check_says_it_pays(member_run, tmp_path):
    """``ensemble.temperature_check`` (the default): per seed, the fitted temperature is applied only when, fitted
    on K - 1 folds of the holdout's out-of-fold logits, it lowered the left-out fold's NLL on the mean. The saved
    stacker, the test metrics and the files the report reads follow the first seed's decision either way."""
    import shutil

    from transfuse.ensemble.stage import format_table
    from transfuse.ensemble.stacker import temperature_line

    cfg, _ = member_run
    run = cfg.model_copy(update={"storage": str(tmp_path), "run": "checked"})
    for stage in ("tune", "data"):
        shutil.copytree(storage.join(storage.run_dir(cfg), stage), storage.join(storage.run_dir(run), stage))
    run = load_config(ROOT / "configs" / "smoke.yaml", [
        f"storage={tmp_path}", "run=checked", "ensemble.folds=3", "ensemble.seeds=[0, 1, 2]",
        "ensemble.temperature_check=true", "ensemble.parallel=local",
        "ensemble.members=[{name: logreg, kind: logistic_regression, params: {max_iter: 300}}]"])
    run_ensemble(run, force=True)
    out = Path(ENSEMBLE.dir(run))
    report = json.loads((out / "metrics.json").read_text())
    decided = {}
    for seed, cal in report["calibration"].items():
        chk = cal["check"]
        assert chk["enabled"] and chk["folds"] == 3 and cal["applied"] == (chk["nll_gain"] > 0)
        assert cal["temperature"] == (cal["fitted_temperature"] if cal["applied"] else 1.0)
        if not cal["applied"]:  # served as fitted; what the rejected temperature would have done is kept
            assert cal["test"]["after"] == cal["test"]["before"] == report["test"][seed]["stack"]
            assert cal["test"]["rejected"]["accuracy"] == cal["test"]["before"]["accuracy"]
            assert cal["test"]["rejected"]["nll"] != cal["test"]["before"]["nll"]
        assert temperature_line(cal) in format_table(report)
        decided[seed] = cal["applied"]
    first = report["calibration"]["0"]
    assert json.loads((out / "stacker.json").read_text())["temperature"] == first["temperature"]
    assert (out / "predictions" / "test_uncalibrated.parquet").exists() == first["applied"]
    # on these members' holdout rows the check rejected every seed's temperature: the rejected branch ran
    assert decided == {"0": False, "1": False, "2": False}


def test_class_weight_balanced_weights_members_and_stacker_and_records_it(member_run, tmp_path):
    """``data.class_weight: balanced`` (the balanced digits leave ``auto`` off: the end-to-end run above): the stage
    fits its members and the stacker class-weighted and records the run's decision, the CNNs' weights on train,
    the final members' on train + holdout and the stacker's on holdout, by class name; every model's test metrics
    carry recall per class name."""
    import shutil

    from transfuse.class_weights import by_name, class_weights

    cfg, splits = member_run
    for stage in ("tune", "data"):
        shutil.copytree(storage.join(storage.run_dir(cfg), stage), str(tmp_path / "weighted" / stage))
    run = load_config(ROOT / "configs" / "smoke.yaml", [
        f"storage={tmp_path}", "run=weighted", "ensemble.folds=3", "ensemble.parallel=local",
        "data.class_weight=balanced", "ensemble.members=[{name: logreg, kind: logistic_regression, "
                                      "params: {max_iter: 300}}]"])
    manifest = run_ensemble(run, force=True)
    out = Path(ENSEMBLE.dir(run))
    report = json.loads((out / "metrics.json").read_text())
    names = json.loads((out / "ensemble.json").read_text())["class_names"]
    cw = report["class_weight"]
    y = {s: splits[s][1] for s in ("train", "holdout")}
    assert cw["on"] and cw["mode"] == "balanced" and manifest["class_weight"] == cw
    for key, labels in (("weights", y["train"]), ("sklearn_final", np.concatenate([y["train"], y["holdout"]])),
                        ("stacker", y["holdout"])):
        assert cw[key] == pytest.approx(by_name(class_weights(labels, 10), names)), key
    assert json.loads((out / "ensemble.json").read_text())["stacker"]["class_weighted"] is True
    assert report["stacker"]["0"]["class_weighted"] is True
    for model, m in report["test"]["0"].items():
        assert list(m["per_class_recall"]) == names, model


def test_pixel_member_reads_the_prepared_images_by_id(ray_cluster, member_run, tmp_path):
    """``features: pixels``: the member is fitted (on Ray, from the shared object) on ``pixel_features`` of the
    prepared split's images, joined by id with the CNN members' rows, saved as ONNX over that view, and reloads to
    the same predictions; scikit-learn fitted here on the same rows and view agrees."""
    import shutil

    from sklearn.linear_model import LogisticRegression

    from transfuse.data import read_split_numpy
    from transfuse.ensemble.inputs import read_pixels
    from transfuse.inference.preprocessing import pixel_features

    cfg, splits = member_run
    run = cfg.model_copy(update={"storage": str(tmp_path), "run": "px"})
    data_dir = PREPARE.dir(cfg)
    for stage in ("tune", "data"):
        shutil.copytree(storage.join(storage.run_dir(cfg), stage), storage.join(storage.run_dir(run), stage))
    run = load_config(ROOT / "configs" / "smoke.yaml", [
        f"storage={tmp_path}", "run=px", "ensemble.folds=3", "ensemble.seeds=[0]", "ensemble.pixel_size=4",
        "ensemble.members=[{name: logreg, kind: logistic_regression, params: {max_iter: 300}},"
        " {name: px, kind: logistic_regression, params: {C: 0.5, max_iter: 500}, features: pixels}]"])
    run_ensemble(run, force=True)
    out = Path(ENSEMBLE.dir(run))
    desc = json.loads((out / "ensemble.json").read_text())
    px = next(e for e in desc["sklearn_members"] if e["name"] == "px")
    assert (px["features"], px["pixel_size"], px["pixels_dim"]) == ("pixels", 4, 16)  # 8x8 digits at 4x4
    assert "embedding_source" not in px
    report = json.loads((out / "metrics.json").read_text())
    assert report["leakage_check"]["leaks"] == 0 and max(report["reload_max_abs_diff"].values()) < 1e-3

    images = {}
    for split in ("train", "holdout", "test"):
        x, y, ids = read_split_numpy(data_dir, split)
        images[split] = (pixel_features(x, 4), y)
    ref = LogisticRegression(C=0.5, max_iter=500, random_state=0).fit(
        np.concatenate([images["train"][0], images["holdout"][0]]),
        np.concatenate([images["train"][1], images["holdout"][1]]))
    sk, _, _, _ = load_saved_members(str(out))
    np.testing.assert_allclose(sk["px"](images["test"][0]), ref.predict_proba(images["test"][0]), atol=1e-4)
    assert report["test"]["0"]["px"]["accuracy"] > 0.5  # 16 pixels still read digits well above chance (0.1)

    ids = {"test": np.append(splits["test"][2][:3], "no-such-id")}
    labels = {"test": np.zeros(4, np.int64)}
    with pytest.raises(EnsembleError, match=r"1 of the members' test ids are not in the prepared data.*no-such-id"):
        read_pixels(data_dir, ids, labels, None)


def test_ensemble_job_cli(member_run, tmp_path):
    import yaml

    from jobs import ensemble as job

    cfg, _ = member_run
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert job.main(["--config", str(path), "--set", "ensemble.seeds=[0]", "--set", "ensemble.parallel=local"]) == 0
    bad = ["--config", str(path), "--set", "ensemble.members=[{name: rf, kind: random_forest, params: {trees: 3}}]"]
    assert job.main(bad) == 2


def test_members_that_disagree_on_ids_are_refused(member_run, tmp_path):
    cfg, splits = member_run
    other = cfg.model_copy(update={"storage": str(tmp_path), "run": "mismatch"})
    tune = Path(TUNE.dir(other))
    shifted = dict(splits)
    x, y, ids = splits["test"]
    shifted["test"] = (x[1:], y[1:], ids[1:])  # one test id missing in trial_b
    write_member_dir(other, tune / "trials" / "trial_a", "trial_a", splits, 8, 0)
    write_member_dir(other, tune / "trials" / "trial_b", "trial_b", shifted, 8, 1)
    storage.write_json(str(tune / "members.json"), {"members": [
        {"name": "trial_a", "dir": "trials/trial_a", "val_accuracy": 0.9},
        {"name": "trial_b", "dir": "trials/trial_b", "val_accuracy": 0.8}]})
    with pytest.raises(EnsembleError, match=r"split 'test': members 'trial_a' and 'trial_b' cover different ids"):
        run_ensemble(other)
