"""The run report on run folders written in the real formats (no Ray): every section drawn from real files, missing
stages named as "not run", an empty run folder, and an unreadable stage output shown rather than raised.

The stage files are produced with the producers' own functions where that is cheap: member metrics with
``transfuse.metrics.evaluate`` on real scikit-learn digits predictions, the ensemble's metrics.json and
ensemble.json with ``transfuse.ensemble.fit_ensemble`` / ``_report`` / ``save_ensemble`` (local runner), the compress
table with ``transfuse.compress.measure_predictor`` / ``with_ratios`` / ``goals``, the depth plot with
``transfuse.search.plot_depth`` and manifests with ``transfuse.storage.write_manifest``.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import smoke_config
from transfuse import metrics as tm
from transfuse import storage
from transfuse.report import write_report

SECTIONS = ("1. Learning curves", "2. Val accuracy against unfreeze depth", "3. Transfer vs scratch",
            "4. Every member vs the ensemble", "5. Confusion matrix and reliability", "6. Compression",
            "7. Pipeline summary")
CLASS_NAMES = [f"digit_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """scikit-learn's digits as (x in [0,1], labels, ids) per split, ids sorted like every reader here."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    ids = np.array([f"digits-{i:04d}" for i in range(len(y))])
    perm = np.random.default_rng(0).permutation(len(y))
    cuts = {"train": perm[:700], "val": perm[700:950], "holdout": perm[950:1300], "test": perm[1300:]}
    out = {}
    for split, idx in cuts.items():
        idx = idx[np.argsort(ids[idx])]
        out[split] = (x[idx], y[idx].astype(np.int64), ids[idx])
    return out


def _train_member(digits, seed: int, epochs: tuple[int, int], alpha: float) -> tuple[object, list[dict]]:
    """A linear softmax model trained epoch by epoch (SGD): a real per-epoch history in train.py's row format.
    The first ``epochs[0]`` epochs are called phase "frozen", the rest "unfrozen" (as train.py names them)."""
    from sklearn.linear_model import SGDClassifier

    x, y, _ = digits["train"]
    xv, yv, _ = digits["val"]
    clf = SGDClassifier(loss="log_loss", alpha=alpha, learning_rate="constant", eta0=0.05, random_state=seed)
    history = []
    for e in range(sum(epochs)):
        clf.partial_fit(x, y, classes=np.arange(10))
        phase = "frozen" if e < epochs[0] else "unfrozen"
        pt, pv = clf.predict_proba(x), clf.predict_proba(xv)
        phase_epoch = e + 1 if phase == "frozen" else e + 1 - epochs[0]
        history.append({"phase": phase, "epoch": e + 1, "phase_epoch": phase_epoch,
                        "loss": tm.nll(pt, y), "accuracy": tm.accuracy(pt, y),
                        "val_loss": tm.nll(pv, yv), "val_accuracy": tm.accuracy(pv, yv)})
    return clf, history


def _write_member(cfg, out_dir: str, digits, seed: int, epochs=(3, 2), alpha: float = 1e-3) -> dict:
    """A member dir as transfuse.train.finalize writes it: metrics.json, predictions/*.parquet, embeddings, manifest."""
    clf, history = _train_member(digits, seed, epochs, alpha)
    evals = {}
    for split in ("train", "val", "test", "holdout"):
        x, y, ids = digits[split]
        probs = clf.predict_proba(x).astype(np.float32)
        cols = [("embeddings", "embedding", x)] + ([] if split == "train" else [("predictions", "probs", probs)])
        for sub, col, arr in cols:
            table = pa.table({"id": pa.array(ids.astype(str)), "label": pa.array(y.astype(np.int64)),
                              col: pa.array(list(arr), type=pa.list_(pa.float32()))})
            path = Path(out_dir) / sub / f"{split}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
        if split != "train":
            evals[split] = tm.evaluate(probs, y)
    metrics = {"history": history, **evals, "epochs": len(history)}
    storage.write_json(storage.join(out_dir, "metrics.json"), metrics)
    storage.write_json(storage.join(out_dir, "model_spec.json"), {"class_names": CLASS_NAMES, "num_classes": 10})
    storage.write_manifest(out_dir, cfg, "finetune", f"fp-{seed}", metrics=evals, epochs=len(history))
    return {"clf": clf, "metrics": metrics}


def _write_tune(cfg, digits, *, plot: bool) -> list[dict]:
    """tune/: trials' member dirs, results.json rows in search._row's format, members.json, the depth plot."""
    from transfuse.search import SEARCHED, plot_depth

    tune = storage.stage_dir(cfg, "tune")
    rows, members = [], []
    for i, (unfreeze, finished) in enumerate(((0, True), (4, True), (4, False), (2, False))):
        trial = f"abcde_{i:05d}"
        conf = {"unfreeze": unfreeze, "lr_frozen": 1e-3, "lr_unfrozen": 1e-4, "head_dense": 64, "dropout": 0.0,
                "seed": i}
        row = {"trial_id": trial, **{k: conf[k] for k in SEARCHED}, "time_s": 3.0 + i, "planned_epochs": 5,
               "error": None, "finished": finished, "stopped_early": not finished, "dir": None,
               "val_accuracy": None, "test_accuracy": None}
        if finished:
            d = storage.join(tune, "trials", trial)
            m = _write_member(cfg, d, digits, seed=i, alpha=1e-3 * (i + 1))["metrics"]
            row.update(best_val_accuracy=max(h["val_accuracy"] for h in m["history"]), epochs_run=len(m["history"]),
                       val_accuracy=m["val"]["accuracy"], test_accuracy=m["test"]["accuracy"], dir=d)
            members.append(row)
        else:  # stopped by the scheduler after one epoch; the last one reported nothing (NaN, as _row writes)
            row.update(best_val_accuracy=0.31 if i == 2 else float("nan"), epochs_run=1 if i == 2 else 0)
        rows.append(row)
    members.sort(key=lambda r: -r["val_accuracy"])
    storage.write_json(storage.join(tune, "results.json"), rows)
    storage.write_json(storage.join(tune, "members.json"), {"members": [
        {"name": f"cnn_{i}_u{r['unfreeze']}", "dir": r["dir"], "trial_id": r["trial_id"],
         "config": {k: r[k] for k in SEARCHED}, "val_accuracy": r["val_accuracy"]} for i, r in enumerate(members)]})
    if plot:
        plot_depth(rows, storage.join(tune, "val_accuracy_vs_depth.png"), cfg.model.unfreeze)
    storage.write_manifest(tune, cfg, "tune", "fp-tune")
    return rows


def _write_ensemble(cfg, digits) -> dict:
    """ensemble/: fitted with the real ensemble code on the tune members' predictions (local runner, 2 seeds)."""
    from transfuse.config import EnsembleConfig, MemberConfig
    from transfuse.ensemble import (LocalRunner, _report, find_cnn_members, fit_ensemble, load_inputs,
                                    save_ensemble, verify_saved)

    ecfg = EnsembleConfig(members=[MemberConfig(name="logreg", kind="logistic_regression",
                                                params={"C": 1.0, "max_iter": 300})],
                          folds=2, seeds=[0, 1], parallel="local")
    members = find_cnn_members(cfg)
    inp, members = load_inputs(cfg.model_copy(update={"ensemble": ecfg}), members)
    fit = fit_ensemble(inp, ecfg, LocalRunner())
    out = storage.stage_dir(cfg, "ensemble")
    save_ensemble(out, fit, inp, members, ecfg)
    report = _report(fit, inp)
    report["reload_max_abs_diff"] = verify_saved(out, fit, inp)
    storage.write_json(storage.join(out, "metrics.json"), report)
    storage.write_manifest(out, cfg, "ensemble", "fp-ens")
    return report


def _write_compress(cfg, digits, clf) -> dict:
    """compress/metrics.json as run_compress writes it: rows measured by compress.measure_predictor on two real
    numpy predictors (float32 weights and weights rounded to int8 steps), ratios and goals from compress."""
    from transfuse.compress import goals, measure_predictor, with_ratios

    x, y, _ = digits["test"]
    w, b = clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)
    scale = float(np.abs(w).max() / 127)
    w8 = np.round(w / scale).astype(np.int8)

    def softmax(z):
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    predictors = {"float32": (lambda im: softmax(im.reshape(len(im), -1) @ w.T + b), w.tobytes() + b.tobytes()),
                  "int8": (lambda im: softmax(im.reshape(len(im), -1) @ (w8.astype(np.float32) * scale).T + b),
                           w8.tobytes() + b.tobytes())}
    rows = []
    for name, (predict, blob) in predictors.items():
        row = {"variant": name, "size_bytes": len(blob), "size_gzip_bytes": len(gzip.compress(blob))}
        row.update(measure_predictor(predict, x, y, latency_runs=5, throughput_runs=2))
        rows.append(row)
    rows = with_ratios(rows)
    report = {"variants": rows, "goals": goals(rows, "int8"), "goals_pruned_int8": {}, "pruning": {},
              "ensemble_source": "ensemble", "num_threads": 1, "test_n": int(len(y)),
              "shared_trunk": {"float32": None, "int8": None},
              "zero_weight_members": {"dropped": ["svc_on_cnn", "cnn_u2"], "kept": ["cnn_u4", "logreg"]}}
    out = storage.stage_dir(cfg, "compress")
    storage.write_json(storage.join(out, "metrics.json"), report)
    storage.write_manifest(out, cfg, "compress", "fp-comp")
    return report


def _html(path: str) -> str:
    assert path.endswith("report/index.html") and Path(path).is_file()
    return Path(path).read_text()


def _check_images(index: str) -> list[str]:
    """Every PNG beside index.html is referenced by it, every reference exists, each opens as a non-empty image."""
    text = Path(index).read_text()
    folder = Path(index).parent
    written = sorted(p.name for p in folder.glob("*.png"))
    referenced = sorted(re.findall(r'<img src="([^"]+)"', text))
    assert written == referenced
    assert not re.search(r"https?://|<script", text)  # self-contained: no network, no JS
    for name in written:
        with Image.open(folder / name) as im:
            im.verify()
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    return written


def _sections(text: str) -> dict[str, str]:
    """Section heading -> its HTML (up to the next heading)."""
    parts = re.split(r"<h2>", text)[1:]
    out = {}
    for part in parts:
        title = part.split("</h2>")[0]
        key = next(s for s in SECTIONS if title.startswith(s))
        out[key] = part
    assert list(out) == list(SECTIONS)
    return out


def test_full_run_report(tmp_path, digits):
    cfg = smoke_config(tmp_path, "full")
    ft = _write_member(cfg, storage.stage_dir(cfg, "finetune"), digits, seed=10)
    scratch = _write_member(cfg, storage.stage_dir(cfg, "scratch"), digits, seed=11, epochs=(0, 2), alpha=1e-1)
    rows = _write_tune(cfg, digits, plot=True)
    ens = _write_ensemble(cfg, digits)
    comp = _write_compress(cfg, digits, ft["clf"])

    index = write_report(cfg)
    text = _html(index)
    images = _check_images(index)
    assert images == sorted(["learning_curves.png", "val_accuracy_vs_depth.png", "transfer_vs_scratch.png",
                             "members_vs_ensemble.png", "confusion_ensemble.png", "reliability.png",
                             "compression.png"])
    sec = _sections(text)
    assert "not run" not in text and "could not be drawn" not in text
    # header: run name, config fingerprint, the git commit the manifests recorded
    assert "full" in text and cfg.fingerprint() in text
    commit = storage.read_manifest(storage.stage_dir(cfg, "ensemble"))["git_commit"]
    if commit:
        assert commit in text
    # 1: the best trial is the first entry of members.json; its phases are named and the boundary is drawn
    best = storage.read_json(storage.join(storage.stage_dir(cfg, "tune"), "members.json"))["members"][0]
    assert best["name"] in sec[SECTIONS[0]] and "frozen: 3 epoch(s), unfrozen: 2 epoch(s)" in sec[SECTIONS[0]]
    best_m = storage.read_json(storage.join(best["dir"], "metrics.json"))
    assert f"{best_m['test']['accuracy']:.4f}" in sec[SECTIONS[0]]
    # 2: a table row per trial, the tune stage's own plot copied byte for byte
    for r in rows:
        assert r["trial_id"] in sec[SECTIONS[1]]
    tune_png = Path(storage.stage_dir(cfg, "tune")) / "val_accuracy_vs_depth.png"
    assert (Path(index).parent / "val_accuracy_vs_depth.png").read_bytes() == tune_png.read_bytes()
    # 3: both test accuracies
    for m in (ft, scratch):
        assert f"{m['metrics']['test']['accuracy']:.4f}" in sec[SECTIONS[2]]
    # 4: every member and combiner with its mean accuracy and ECE
    for model, s in ens["summary"].items():
        assert f"<td>{model}</td>" in sec[SECTIONS[3]]
        assert f"{s['accuracy']['mean']:.4f}" in sec[SECTIONS[3]] and f"{s['ece']['mean']:.4f}" in sec[SECTIONS[3]]
    assert ens["best_member"]["name"] in sec[SECTIONS[3]]
    order = storage.read_json(storage.join(storage.stage_dir(cfg, "ensemble"), "ensemble.json"))["member_order"]
    expected = order + ["average", "hard_vote", "greedy", "stack"]  # members in the ensemble's order, then combiners
    positions = [sec[SECTIONS[3]].index(f"<td>{m}</td>") for m in expected]
    assert positions == sorted(positions) and len(expected) == len(ens["summary"])
    # 5: the caption says the reliability diagram is of a CNN member, not the ensemble
    assert "not of the stacked ensemble" in sec[SECTIONS[4]]
    # 6: a row per variant with its size and accuracy; the members left out at zero stacker weight are named
    assert "zero stacker weight" in sec[SECTIONS[5]] and "svc_on_cnn, cnn_u2" in sec[SECTIONS[5]]
    for r in comp["variants"]:
        assert f"<td>{r['variant']}</td>" in sec[SECTIONS[5]]
        assert f"{r['size_bytes']:,}" in sec[SECTIONS[5]] and f"{r['accuracy']:.4f}" in sec[SECTIONS[5]]
    # 7: the pipeline's own summary rows
    assert "stacked ensemble" in sec[SECTIONS[6]] and "same network from scratch" in sec[SECTIONS[6]]


def test_partial_run_names_missing_stages(tmp_path, digits):
    """finetune and a tune without its plot: the report draws the depth plot itself and names the missing stages;
    a rerun replaces the earlier report's files."""
    cfg = smoke_config(tmp_path, "partial")
    _write_member(cfg, storage.stage_dir(cfg, "finetune"), digits, seed=3, epochs=(2, 0))
    index = write_report(cfg)
    sec = _sections(_html(index))
    assert "the seed&#x27;s fixed-depth model" in sec[SECTIONS[0]] and "one phase only" in sec[SECTIONS[0]]
    assert "stage tune not run" in sec[SECTIONS[1]]
    assert "stage scratch not run" in sec[SECTIONS[2]] and "stage finetune not run" not in sec[SECTIONS[2]]
    assert "stage ensemble not run" in sec[SECTIONS[3]]
    assert "stage ensemble not run" in sec[SECTIONS[4]] and "reliability.png" in sec[SECTIONS[4]]
    assert "stage compress not run" in sec[SECTIONS[5]]
    assert sorted(_check_images(index)) == ["learning_curves.png", "reliability.png", "transfer_vs_scratch.png"]

    _write_tune(cfg, digits, plot=False)
    index = write_report(cfg)
    sec = _sections(_html(index))
    assert "not run" not in sec[SECTIONS[1]] and "written by the tune stage" not in sec[SECTIONS[1]]
    assert "val_accuracy_vs_depth.png" in _check_images(index)


def test_empty_run_every_section_not_run(tmp_path):
    cfg = smoke_config(tmp_path, "empty")
    index = write_report(cfg)
    text = _html(index)
    assert _check_images(index) == []
    sec = _sections(text)
    for title in SECTIONS:
        assert "not run" in sec[title], title
    assert "no stage has written a manifest yet" in text and "could not be drawn" not in text


def test_command_line_writes_the_report(tmp_path, capsys):
    from conftest import ROOT
    from transfuse.report import main

    assert main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"storage={tmp_path}",
                 "--set", "run=cli"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(tmp_path / "cli" / "report" / "index.html") and "<h2>7. Pipeline summary</h2>" in _html(path)


def test_unreadable_stage_output_is_shown_not_raised(tmp_path, digits):
    """An ensemble metrics.json without its summary: that section names the error, the others are still drawn."""
    cfg = smoke_config(tmp_path, "broken")
    _write_member(cfg, storage.stage_dir(cfg, "finetune"), digits, seed=5)
    storage.write_json(storage.join(storage.stage_dir(cfg, "ensemble"), "metrics.json"), {"seeds": [0]})
    index = write_report(cfg)
    sec = _sections(_html(index))
    assert "could not be drawn: KeyError" in sec[SECTIONS[3]] and "summary" in sec[SECTIONS[3]]
    assert "stage ensemble not run" in sec[SECTIONS[4]]  # no confusion matrix in it
    assert "learning_curves.png" in _check_images(index)


def test_seed_range_of_equal_values_draws(tmp_path):
    """Three seeds with the same accuracy: np.mean([0.1] * 3) is one ulp above 0.1, which once made a negative
    error bar and cost the default run's report its 'members vs ensemble' plot."""
    cfg = smoke_config(tmp_path, "equal")
    values = [0.1, 0.1, 0.1]
    assert float(np.mean(values)) > min(values)  # the rounding this test is about
    stat = {"mean": float(np.mean(values)), "min": min(values), "max": max(values), "values": values}
    summary = {m: {"accuracy": stat, "nll": stat, "ece": stat} for m in ("logreg", "average", "stack")}
    storage.write_json(storage.join(storage.stage_dir(cfg, "ensemble"), "metrics.json"),
                       {"seeds": [0, 1, 2], "summary": summary})
    sec = _sections(_html(write_report(cfg)))
    assert "members_vs_ensemble.png" in sec[SECTIONS[3]] and "could not be drawn" not in sec[SECTIONS[3]]
