"""The member search (Ray Tune over the scikit-learn members) on digits: it beats a deliberately bad fixed member and
the stack built from its choice beats the fixed list's out of fold; no trial sees a test row; an interrupted search
resumes without refitting its finished trials, and the same seed gives the same choice; the plan shows it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests._ensemble_helpers import write_member_run
from tests.conftest import ROOT
from transfuse import storage
from transfuse.config import MEMBER_KINDS, ConfigError, load_config
from transfuse.ensemble import ENSEMBLE
from transfuse.ensemble.inputs import holdout_folds, load_inputs
from transfuse.ensemble.learners import MemberError
from transfuse.ensemble.member_search import (DEFAULT_SPACE, PLOT, RESULTS_CSV, RESULTS_JSON, SEARCH_DIR, SHORT,
                                              check_trials, max_overlap, paired_gain, read_records, select,
                                              validate_search)
from transfuse.ensemble.stacker import LeakageError
from transfuse.ensemble.stage import run_ensemble

BAD_C = 1e-4  # so strong an L2 penalty that the logistic regression predicts little more than the class prior
FIXED = [  # the fixed list: one deliberately bad member, on the pixel view (the CNN members' own embeddings would
    # only repeat them: these "CNNs" are MLPs whose output layer is a logistic regression on that embedding)
    f"ensemble.members=[{{name: px_bad, kind: logistic_regression, params: {{C: {BAD_C}, max_iter: 300}},"
    " features: pixels}]",
    "ensemble.folds=3", "ensemble.seeds=[0]", "ensemble.stacker_grid_C=[1.0]",
]
# the fixed member's trial and 4 drawn ones: 5 trials
SEARCH = ["ensemble.search.enabled=true", "ensemble.search.kinds=[logistic_regression]",
          "ensemble.search.features=[pixels]", "ensemble.search.num_samples=4",
          "ensemble.search.space={logistic_regression: {C: {loguniform: [0.01, 100]}, max_iter: 300}}",
          "ensemble.search.cpus_per_trial=0.5"]
TRIALS = 1 + 4


def _config(run_cfg, *overrides: str):
    return load_config(ROOT / "configs" / "smoke.yaml",
                       [f"storage={run_cfg.storage}", f"run={run_cfg.run}", *FIXED, *overrides])


@pytest.fixture(scope="module")
def runs(digits_run, tmp_path_factory):
    """The same two CNN members, once stacked with the fixed list and once with the member search's choice."""
    fixed, splits = write_member_run(digits_run, tmp_path_factory.mktemp("fixed"), "fixed")
    searched, _ = write_member_run(digits_run, tmp_path_factory.mktemp("searched"), "searched")
    fixed, searched = _config(fixed), _config(searched, *SEARCH, "ensemble.search.max_concurrent=4")
    run_ensemble(fixed)
    run_ensemble(searched)
    return fixed, searched, splits


def _out(cfg) -> Path:
    return Path(ENSEMBLE.dir(cfg))


def _read(cfg, name: str) -> dict:
    return json.loads((_out(cfg) / name).read_text())


def _stack_oof_nll(cfg) -> float:
    """The chosen stacker's cross-validated NLL on the holdout rows (out-of-fold member predictions): the lowest of
    its candidates' (stacker: auto picks by it)."""
    (sel,) = _read(cfg, "metrics.json")["stacker"].values()
    return min(c["cv_nll"] for c in sel["selection"])


def test_search_finds_a_better_C_and_a_better_stack(runs):
    fixed, searched, _ = runs
    results = _read(searched, RESULTS_JSON)
    rows, chosen = results["trials"], {c["name"]: c for c in results["summary"]["chosen"]}
    assert len(rows) == TRIALS and all(r["error"] is None for r in rows)
    bad = next(r for r in rows if r["fixed"] == "px_bad")
    assert bad["params"]["C"] == BAD_C and bad["view"] == "pixels"
    assert set(chosen) == {"logreg_px"}  # the best of its (kind, view family)
    assert chosen["logreg_px"]["fixed"] is None and chosen["logreg_px"]["params"]["C"] > 100 * BAD_C
    assert chosen["logreg_px"]["oof_nll"] < bad["oof_nll"]
    gain = chosen["logreg_px"]["vs_fixed"]  # it displaced the fixed member by more than one paired SE
    assert gain["fixed"] == "px_bad" and gain["mean_nll_difference"] + gain["se"] < 0
    assert gain["mean_nll_difference"] == pytest.approx(chosen["logreg_px"]["oof_nll"] - bad["oof_nll"], abs=1e-4)
    for c in chosen.values():  # each is the best of its family out of fold
        family = [r["oof_nll"] for r in rows if r["features"] == c["features"]]
        assert c["oof_nll"] == min(family)
    # the stack is built from the chosen members and the CNN members, and is better out of fold
    desc = _read(searched, "ensemble.json")
    assert desc["member_order"] == ["trial_a", "trial_b", *[c["name"] for c in results["summary"]["chosen"]]]
    (entry,) = desc["sklearn_members"]
    assert (entry["name"], entry["features"]) == ("logreg_px", "pixels")
    assert entry["params"]["C"] == chosen["logreg_px"]["params"]["C"]
    assert _stack_oof_nll(searched) < _stack_oof_nll(fixed)
    # the results table, JSON and plot are stage outputs (checksummed in the manifest)
    files = storage.read_manifest(str(_out(searched)))["files"]
    assert {RESULTS_JSON, RESULTS_CSV, PLOT} <= set(files)
    assert (_out(searched) / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = (_out(searched) / RESULTS_CSV).read_text().splitlines()
    assert len(csv) == len(rows) + 1 and {"start", "end", "oof_nll"} <= set(csv[0].split(","))
    summary = results["summary"]
    assert summary["max_overlap"] == max_overlap(rows) and 1 <= summary["max_overlap"] <= 4
    assert not (_out(fixed) / RESULTS_JSON).exists()  # the fixed list alone: no search


def test_no_trial_sees_a_test_row(runs):
    """Every trial's fold models were fitted on train + the other holdout folds of the stacker's own folds and
    predicted their fold; none saw a test id; the id-based check says so, and fails on a tampered record."""
    _, searched, splits = runs
    train, test = set(splits["train"][2]), set(splits["test"][2])
    inp, _ = load_inputs(searched)
    ho_ids, ho_labels = inp.ids["holdout"], inp.labels["holdout"]
    stacker_folds = [set(ho_ids[f]) for f in holdout_folds(ho_labels, 3, 0)]
    base = _out(searched) / SEARCH_DIR
    results = _read(searched, RESULTS_JSON)
    for r in results["trials"]:
        records = json.loads((base / "records" / f"{r['trial_id']}.json").read_text())["records"]
        assert [set(x["predicted_ids"]) for x in records] == stacker_folds
        for x, fold in zip(records, stacker_folds):
            assert set(x["fit_ids"]) == train | (set(ho_ids) - fold) and not set(x["fit_ids"]) & test
    assert results["summary"]["leakage_check"]["leaks"] == 0
    tampered = base / "records" / f"{results['trials'][0]['trial_id']}.json"
    original = tampered.read_text()
    try:
        d = json.loads(original)
        d["records"][0]["fit_ids"].append(str(splits["test"][2][0]))
        tampered.write_text(json.dumps(d))
        with pytest.raises(LeakageError, match=r"fitted on 1 test ids"):
            check_trials(read_records(str(base), results["trials"]), inp)
    finally:
        tampered.write_text(original)


def test_a_class_weighted_search_fits_and_scores_its_trials_weighted(runs, digits_run, tmp_path):
    """``data.class_weight: balanced``: the search says it weighted, its fingerprint differs from the unweighted
    one's, each trial's score is the mean of its stored per-row (weighted) NLL, and the fixed member's score on
    the same folds moves from the unweighted search's (its fits and its score are weighted; the effect of the
    weights on an imbalanced set is test_class_weights.py's)."""
    _, unweighted, _ = runs
    run, _ = write_member_run(digits_run, tmp_path, "weighted")
    cfg = _config(run, *SEARCH, "data.class_weight=balanced")
    run_ensemble(cfg)
    results, plain = _read(cfg, RESULTS_JSON), _read(unweighted, RESULTS_JSON)
    assert results["summary"]["class_weighted"] is True and plain["summary"]["class_weighted"] is False
    assert results["summary"]["fingerprint"] != plain["summary"]["fingerprint"]
    assert _read(cfg, "metrics.json")["class_weight"]["on"] is True
    base = _out(cfg) / SEARCH_DIR
    for r in results["trials"]:
        row_nll = np.asarray(json.loads((base / "records" / f"{r['trial_id']}.json").read_text())["row_nll"])
        assert r["oof_nll"] == pytest.approx(row_nll.mean(), rel=1e-9)
    assert results["summary"]["seed"] == plain["summary"]["seed"]  # the same folds
    weighted_bad = next(t for t in results["trials"] if t["fixed"] == "px_bad")
    unweighted_bad = next(t for t in plain["trials"] if t["fixed"] == "px_bad")
    # (the digits are nearly balanced: weights near 1 move it little, 2.6e-5 here; unweighted it repeats exactly)
    assert weighted_bad["oof_nll"] != pytest.approx(unweighted_bad["oof_nll"], rel=1e-9, abs=0.0)


def test_interrupted_search_resumes_without_refitting_and_repeats_the_choice(ray_cluster, runs, digits_run,
                                                                             tmp_path):
    """One trial at a time; SIGINT to the ensemble job once two trials stored their records; the rerun restores the
    experiment: the finished trials' records are untouched (a trial stopped mid-way runs again), the rest complete,
    and the choice, trial by trial, equals that of the uninterrupted search with the same seed (4 at a time)."""
    _, searched, _ = runs
    cfg, _ = write_member_run(digits_run, tmp_path, "resume")
    cfg = _config(cfg, *SEARCH, "ensemble.search.max_concurrent=1")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    records = _out(cfg) / SEARCH_DIR / "records"

    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.ensemble", "--config", str(path)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    # interrupt once two trials have stored their record (written the moment a fit ends, with its score)
    while proc.poll() is None and time.time() < deadline and len(list(records.glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Tune saves the experiment's state and stops
    code = proc.wait(timeout=120)
    tail = (tmp_path / "first.log").read_text()[-3000:]
    done = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in records.glob("*.json")}
    assert 2 <= len(done) < TRIALS, tail  # interrupted part-way
    assert code != 0 and not (_out(cfg) / storage.MANIFEST).exists(), tail  # the stage did not complete
    assert "interrupted" in tail, tail

    run_ensemble(load_config(path, []))  # restores the experiment
    # no finished trial was fitted again, even one Tune's saved state still called running (it reports its record)
    for name, (mtime, text) in done.items():
        p = records / name
        assert p.stat().st_mtime_ns == mtime and p.read_text() == text
    got, want = _read(cfg, RESULTS_JSON), _read(searched, RESULTS_JSON)
    assert len(list(records.glob("*.json"))) == len(got["trials"]) == TRIALS
    strip = lambda rows: [(r["kind"], r["view"], r["params"], r["oof_nll"]) for r in rows]  # noqa: E731
    assert strip(got["trials"]) == strip(want["trials"])
    assert [(c["name"], c["params"], c["view"]) for c in got["summary"]["chosen"]] == [
        (c["name"], c["params"], c["view"]) for c in want["summary"]["chosen"]]
    assert got["summary"]["max_overlap"] == 1  # one trial at a time, as configured


def test_trials_are_drawn_before_tune_from_the_seed():
    """The default's space, drawn by ``candidates``: concrete values (JSON, no Tune domain), the same trials for
    the same seed, other trials for another seed, each drawn value inside its range."""
    from transfuse.ensemble.member_search import candidates

    e = load_config(ROOT / "configs" / "default.yaml", ["ensemble.search.enabled=true"]).ensemble
    draw = lambda seed: candidates(e, ["cnn_a", "cnn_b"], "cnn_a", seed)  # noqa: E731
    a = draw(0)
    assert json.loads(json.dumps(a)) == a == draw(0) and a != draw(1)
    assert [t["fixed"] for t in a[:len(e.members)]] == [m.name for m in e.members]
    drawn = a[len(e.members):]
    assert len(drawn) == len(e.search.kinds) * len(e.search.features) * e.search.num_samples
    assert {t["view"] for t in drawn if t["features"] == "embedding"} == {"cnn_a", "cnn_b"}
    lo, hi = DEFAULT_SPACE["logistic_regression"]["C"]["loguniform"]
    assert all(lo <= t["params"]["C"] <= hi for t in drawn if t["kind"] == "logistic_regression")


def test_selection_and_overlap_from_rows():
    row = lambda i, kind, features, nll, view="a", C=1.0, start=0.0, end=1.0, fixed=None: {  # noqa: E731
        "trial": i, "trial_id": f"t{i}", "kind": kind, "features": features, "view": view, "params": {"C": C},
        "oof_nll": nll, "start": start, "end": end, "fixed": fixed}
    rows = [row(0, "svc", "embedding", 0.5), row(1, "svc", "embedding", 0.3, C=2.0),
            row(2, "svc", "embedding", 0.3, C=3.0), row(3, "svc", "pixels", 0.9, "pixels"),
            row(4, "logistic_regression", "embedding", None), row(5, "svc", "embedding", 0.3, C=2.0)]
    # ties go to the earlier trial; a configuration drawn twice (trial 5 = trial 1) is kept once; unscored: never
    assert [(n, r["trial"]) for n, r in select(rows, 1)] == [("svc", 1), ("svc_px", 3)]
    assert [(n, r["trial"]) for n, r in select(rows, 3)] == [("svc", 1), ("svc_2", 2), ("svc_3", 0),
                                                             ("svc_px", 3)]
    # the one-standard-error rule: a fixed trial keeps its family's place against drawn trials that score lower
    # out of fold but not by more than se_rule paired standard errors of the per-row NLL difference
    z = np.random.default_rng(0).normal(size=100)
    z = (z - z.mean()) / z.std(ddof=1)  # exactly mean 0, sd 1: the SE of 0.3 z over 100 rows is 0.03
    base = np.random.default_rng(1).exponential(0.3, 100) + 1.0
    per_row = {"t0": base, "t1": base - 0.02 + 0.3 * z, "t2": base - 0.01 + 0.001 * z}
    fam = [row(i, "svc", "embedding", float(per_row[f"t{i}"].mean()), C=C, fixed=fixed)
           for i, C, fixed in ((0, 1.0, "svc"), (1, 5.0, None), (2, 9.0, None))]
    assert fam[1]["oof_nll"] < fam[2]["oof_nll"] < fam[0]["oof_nll"]
    assert select(fam, 1)[0][1]["trial"] == 1  # no rule: the lowest score
    # t1's gain (0.02) is less than its SE (0.03): noise; t2's (0.01, SE 1e-4) is consistent
    assert select(fam, 1, per_row, se_rule=1.0)[0][1]["trial"] == 2
    assert [(n, r["trial"]) for n, r in select(fam, 3, per_row, se_rule=1.0)] == [("svc_3", 1), ("svc", 2),
                                                                                ("svc_2", 0)]
    per_row["t2"] = base  # no gain at all: the fixed trial keeps its place
    fam[2]["oof_nll"] = fam[0]["oof_nll"]
    assert select(fam, 1, per_row, se_rule=1.0)[0][1]["trial"] == 0
    assert paired_gain(per_row, "t1", "t0") == pytest.approx((-0.02, 0.03))
    timed = [row(0, "svc", "embedding", 1, start=0, end=4), row(1, "svc", "embedding", 1, start=1, end=2),
             row(2, "svc", "embedding", 1, start=2, end=3), row(3, "svc", "embedding", 1, start=4, end=5)]
    assert max_overlap(timed) == 2  # touching bars (2 -> 2, 4 -> 4) do not overlap
    assert set(DEFAULT_SPACE) == set(SHORT) == set(MEMBER_KINDS)  # every kind has a default space


BAD_SEARCH = [
    # (overrides, exception, message pattern)
    (["ensemble.search.kinds=[xgboost]"], ConfigError, r"ensemble.search.kinds .*must be distinct kinds from "
                                                         r"random_forest, .*got \['xgboost'\]"),
    (["ensemble.search.features=[voxels]"], ConfigError, r"ensemble.search.features.0.*'embedding' or 'pixels'"),
    (["ensemble.search.space={svc: {C: {loguniform: [0, 10]}}}"], ConfigError,
     r"space.svc.C: loguniform needs \[low, high\] with low < high and low > 0, got \[0, 10\]"),
    (["ensemble.search.space={svc: {C: {normal: [0, 1]}}}"], ConfigError,
     r"space.svc.C: a sampled value is one of \{loguniform, uniform, lograndint, randint, choice\}"),
    (["ensemble.search.space={rf: {n_estimators: 10}}"], ConfigError, r"space: unknown kind 'rf'; allowed: "),
    (["ensemble.search.space={random_forest: {n_estimators: {randint: [1.5, 9]}}}"], ConfigError,
     r"randint needs integer bounds"),
    (["ensemble.members=[{name: p, kind: svc, features: pixels, embedding_of: trial_a}]"], ConfigError,
     r"member 'p': embedding_of='trial_a' names a CNN member's embedding, but features='pixels'"),
    (["ensemble.search.enabled=true", "ensemble.search.kinds=[svc]",
      "ensemble.search.space={svc: {gama: {loguniform: [0.1, 1]}}}"], MemberError,
     r"ensemble.search.space.svc.gama = .*unknown parameter 'gama'; allowed: C, .*gamma"),
    (["ensemble.search.enabled=true", "ensemble.search.kinds=[random_forest]",
      "ensemble.search.space={random_forest: {max_depth: {choice: [null, 0]}}}"], MemberError,
     r"ensemble.search.space.random_forest.max_depth .*'max_depth' parameter of RandomForestClassifier must be"),
]


@pytest.mark.parametrize("overrides, exc, pattern", BAD_SEARCH)
def test_bad_search_config_fails_with_a_clear_error(overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        validate_search(load_config(None, overrides).ensemble)


def test_plan_shows_the_member_search_space_and_its_resources(tmp_path):
    from transfuse.ensemble.plan import ensemble_plan

    cfg = load_config(ROOT / "configs" / "default.yaml", [f"storage={tmp_path}", "ensemble.search.enabled=true"])
    ms = ensemble_plan(cfg)["member_search"]
    assert ms["param_space"]["svc"] == {"C": "loguniform(0.1, 1000.0)", "gamma": "loguniform(0.0001, 1.0)"}
    assert ms["param_space"]["random_forest"]["max_depth"] == "choice([None, 8, 16])"
    assert ms["param_space"]["logistic_regression"]["max_iter"] == 2000  # a constant stays a constant
    # default.yaml's three fixed members + 4 kinds x 2 views x 6 draws
    assert ms["trials"] == 3 + 4 * 2 * 6 and ms["fixed_trials"] == ["logreg", "svc", "px_logreg"]
    assert ms["resources_per_trial"] == {"CPU": 1.0} and ms["cpus_at_full_concurrency"] == 4.0
    assert ms["score"] == "out-of-fold NLL over the stacker's 5 holdout folds"
    assert set(ms["views"]) == {"embedding", "pixels"}
    off = ensemble_plan(load_config(ROOT / "configs" / "default.yaml", [f"storage={tmp_path}"]))["member_search"]
    assert off == {"enabled": False, "members": "ensemble.members as given (the fixed list)"}
    assert not any(tmp_path.iterdir())  # the plan wrote nothing
