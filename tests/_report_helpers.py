"""Run folders in the real formats for the report tests (no Ray, a few seconds): scikit-learn's digits as the
prepared data, linear softmax members with real per-epoch histories, a real ensemble fit, and two real bundles
(float32 and int8 weights of one linear ONNX model) measured by the compress stage's own functions.

The stage files are produced with the producers' own functions where that is cheap: member metrics with
``transfuse.metrics.evaluate``, the ensemble's metrics.json and ensemble.json with
``transfuse.ensemble.stage.fit_ensemble`` / ``_report`` / ``save_ensemble`` (local runner), bundles with
``transfuse.inference.bundle_writer.write_bundle``, the compress table with ``transfuse.compress.measure.variant_row`` /
``with_ratios`` / ``goals``, the depth plot with ``transfuse.finetune.tune.plot_depth`` and manifests with
``transfuse.storage.write_manifest``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transfuse import metrics as tm
from transfuse import storage
from transfuse.compress import COMPRESS
from transfuse.data import PREPARE
from transfuse.ensemble import ENSEMBLE
from transfuse.finetune import FINETUNE, SCRATCH, TUNE

CLASS_NAMES = [f"digit_{i}" for i in range(10)]
SIDE = 8  # digits are 8 x 8 grey images


@functools.lru_cache(maxsize=1)
def digits() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """scikit-learn's digits as (x in [0,1] flattened, labels, ids) per split, ids sorted like every reader here.
    x is exactly what the uint8 images of ``write_data`` give after ``preprocess`` ("unit": / 255)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (np.round(x / 16.0 * 255.0) / 255.0).astype(np.float32)
    ids = np.array([f"digits-{i:04d}" for i in range(len(y))])
    perm = np.random.default_rng(0).permutation(len(y))
    cuts = {"train": perm[:700], "val": perm[700:950], "holdout": perm[950:1300], "test": perm[1300:]}
    out = {}
    for split, idx in cuts.items():
        idx = idx[np.argsort(ids[idx])]
        out[split] = (x[idx], y[idx].astype(np.int64), ids[idx])
    return out


def images_of(x: np.ndarray) -> np.ndarray:
    """uint8 N x 8 x 8 x 1 images from digits' [0, 1] rows."""
    return np.round(x.reshape(-1, SIDE, SIDE, 1) * 255.0).astype(np.uint8)


def write_data(cfg, data, label_budget: dict | None = None) -> None:
    """data/: every split as parquet of (image, label, id) as prepare writes it, and its manifest."""
    from ray.data.extensions import ArrowTensorArray

    out = PREPARE.dir(cfg)
    for split, (x, y, ids) in data.items():
        path = Path(out) / split / "part-00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image": ArrowTensorArray.from_numpy(images_of(x)), "label": pa.array(y),
                                 "id": pa.array(ids.astype(str), type=pa.string())}), path)
    extra = {"label_budget": label_budget} if label_budget else {}
    storage.write_manifest(out, cfg, "prepare", "fp-data", class_names=CLASS_NAMES, image_shape=[SIDE, SIDE, 1],
                           totals={s: int(len(v[1])) for s, v in data.items()}, **extra)


def _train_member(data, seed: int, epochs: tuple[int, int], alpha: float) -> tuple[Any, list[dict]]:
    """A linear softmax model trained epoch by epoch (SGD): a real per-epoch history in the fine-tuning loop's row
    format (``FinetuneTask.fit_epoch``). The first ``epochs[0]`` epochs are called phase "frozen", the rest
    "unfrozen"."""
    from sklearn.linear_model import SGDClassifier

    x, y, _ = data["train"]
    xv, yv, _ = data["val"]
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


def write_member(cfg, out_dir: str, data, seed: int, epochs=(3, 2), alpha: float = 1e-3) -> dict:
    """A member dir as transfuse.finetune.stage.finalize writes it: metrics.json, predictions/*.parquet, embeddings,
    manifest."""
    clf, history = _train_member(data, seed, epochs, alpha)
    evals = {}
    for split in ("train", "val", "test", "holdout"):
        x, y, ids = data[split]
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


def write_tune(cfg, data, *, plot: bool) -> list[dict]:
    """tune/: trials' member dirs, results.json rows in search.result_row's format, members.json, summary.json, the plot."""
    from transfuse.finetune.tune import SEARCHED, plot_depth

    tune = TUNE.dir(cfg)
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
            m = write_member(cfg, d, data, seed=i, alpha=1e-3 * (i + 1))["metrics"]
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
    best = members[0]
    storage.write_json(storage.join(tune, "summary.json"), {  # as finetune.tune.run_search writes it
        "trials": len(rows), "finished": len(members), "stopped_early": len(rows) - len(members), "errored": 0,
        "best": {k: best[k] for k in (*SEARCHED, "val_accuracy", "test_accuracy")}, "seconds": 1.0})
    if plot:
        plot_depth(rows, storage.join(tune, "val_accuracy_vs_depth.png"), cfg.model.unfreeze)
    storage.write_manifest(tune, cfg, "tune", "fp-tune")
    return rows


def write_ensemble(cfg, *, pixels: bool = True, temperature_check: bool = True) -> dict:
    """ensemble/: fitted with the real ensemble code on the tune members' predictions (local runner, 2 seeds), with
    a logistic regression on the embeddings and (``pixels``, reading data/) one on the pixels."""
    from transfuse.config import EnsembleConfig, MemberConfig
    from transfuse.ensemble.stage import fit_ensemble, fit_report, save_ensemble, verify_saved
    from transfuse.ensemble.inputs import find_cnn_members, load_inputs
    from transfuse.ensemble.learners import LocalRunner

    members_cfg = [MemberConfig(name="logreg", kind="logistic_regression", params={"C": 1.0, "max_iter": 300})]
    if pixels:
        members_cfg.append(MemberConfig(name="px_logreg", kind="logistic_regression",
                                        params={"C": 0.1, "max_iter": 300}, features="pixels"))
    ecfg = EnsembleConfig(members=members_cfg, folds=2, seeds=[0, 1], parallel="local",
                          temperature_check=temperature_check)
    members = find_cnn_members(cfg)
    inp, members = load_inputs(cfg.model_copy(update={"ensemble": ecfg}), members)
    fit = fit_ensemble(inp, ecfg, LocalRunner())
    out = ENSEMBLE.dir(cfg)
    save_ensemble(out, fit, inp, members, ecfg)
    report = fit_report(fit, inp)
    report["reload_max_abs_diff"] = verify_saved(out, fit, inp)
    storage.write_json(storage.join(out, "metrics.json"), report)
    storage.write_manifest(out, cfg, "ensemble", "fp-ens")
    return report


@dataclass
class Linear:
    """A softmax over preprocessed pixels, N x 8 x 8 x 3 ("unit", grey repeated): ``w`` 192 x 10, ``b`` 10."""

    w: np.ndarray
    b: np.ndarray

    @classmethod
    def of(cls, clf) -> "Linear":
        """The weights of a classifier of digits' 64 [0, 1] pixels, spread over preprocess's 3 equal channels."""
        w = np.repeat(clf.coef_.T.astype(np.float32) / 3.0, 3, axis=0)  # row (pixel p, channel c) = 3p + c
        return cls(w, clf.intercept_.astype(np.float32))

    def int8(self) -> tuple[np.ndarray, float]:
        scale = float(np.abs(self.w).max() / 127.0)
        return np.round(self.w / scale).astype(np.int8), scale

    def probs(self, x: np.ndarray, quantized: bool = False) -> np.ndarray:
        """numpy's own answer for digits' rows ``x``: what the bundle's ONNX graph must give."""
        w = self.w
        if quantized:
            q, scale = self.int8()
            w = q.astype(np.float32) * scale
        z = np.repeat(x, 3, axis=1) @ w + self.b
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def onnx(self, quantized: bool) -> bytes:
        """Flatten -> MatMul -> Add, ``logits``; int8: the weights stored as int8 and a DequantizeLinear node."""
        from onnx import TensorProto, helper, numpy_helper

        nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1)]
        inits = [numpy_helper.from_array(self.b, "B")]
        if quantized:
            q, scale = self.int8()
            inits += [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(np.float32(scale), "scale"),
                      numpy_helper.from_array(np.int8(0), "zero")]
            nodes.append(helper.make_node("DequantizeLinear", ["Wq", "scale", "zero"], ["W"]))
        else:
            inits.append(numpy_helper.from_array(self.w, "W"))
        nodes += [helper.make_node("MatMul", ["flat", "W"], ["z"]), helper.make_node("Add", ["z", "B"], ["logits"])]
        graph = helper.make_graph(
            nodes, "linear", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, SIDE, SIDE, 3])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        return model.SerializeToString()


def write_compress(cfg, data, clf) -> tuple[dict, Linear]:
    """compress/<variant>/ bundles (float32 and int8 weights of ``clf``) and compress/metrics.json as run_compress
    writes it: rows measured by measure.variant_row on the loaded bundles, ratios and goals from compress."""
    from transfuse.inference.bundle_writer import BundleCnn, write_bundle
    from transfuse.compress.measure import goals, variant_row, with_ratios
    from transfuse.inference.preprocessing import PreprocessSpec

    x, y, _ = data["test"]
    lin = Linear.of(clf)
    out = COMPRESS.dir(cfg)
    rows = []
    for variant in ("float32", "int8"):
        d = storage.join(out, variant)
        write_bundle(d, name="report-test", version="1", class_names=CLASS_NAMES, input_shape=(SIDE, SIDE, 1),
                     preprocess_spec=PreprocessSpec(SIDE, "unit"), variant=variant,
                     cnn_members=[BundleCnn("linear", lin.onnx(variant == "int8"), format="onnx", input="image",
                                            embedding_output=None)])
        rows.append(variant_row(d, images_of(x), y, latency_runs=5, throughput_runs=2))
    rows = with_ratios(rows)
    report = {"variants": rows, "goals": goals(rows, cfg.goals, "int8"), "goals_pruned_int8": {}, "pruning": {},
              "ensemble_source": "ensemble", "num_threads": 1, "test_n": int(len(y)),
              "shared_trunk": {"float32": None, "int8": None},
              "zero_weight_members": {"dropped": ["svc_on_cnn", "cnn_u2"], "kept": ["cnn_u4", "logreg"]}}
    storage.write_json(storage.join(out, "metrics.json"), report)
    storage.write_manifest(out, cfg, "compress", "fp-comp")
    return report, lin


@dataclass
class FullRun:
    finetune: dict
    scratch: dict
    tune_rows: list[dict]
    ensemble: dict
    compress: dict
    linear: Linear


def write_full_run(cfg, data, label_budget: dict | None = None, temperature_check: bool = True) -> FullRun:
    """Every stage the report reads, in its real format."""
    write_data(cfg, data, label_budget)
    ft = write_member(cfg, FINETUNE.dir(cfg), data, seed=10)
    scratch = write_member(cfg, SCRATCH.dir(cfg), data, seed=11, epochs=(0, 2), alpha=1e-1)
    rows = write_tune(cfg, data, plot=True)
    ens = write_ensemble(cfg, temperature_check=temperature_check)
    comp, lin = write_compress(cfg, data, ft["clf"])
    return FullRun(ft, scratch, rows, ens, comp, lin)


def expected_verdict(cfg) -> dict[str, tuple[Optional[float], Optional[bool]]]:
    """Each verdict row's difference and met flag (None, None: not run), computed here from the stage files."""
    g = cfg.goals

    def test_accuracy(d: str) -> Optional[float]:
        path = storage.join(d, "metrics.json")
        return storage.read_json(path)["test"]["accuracy"] if storage.exists(path) else None

    ft, scratch = (test_accuracy(storage.join(storage.run_dir(cfg), s)) for s in ("finetune", "scratch"))
    ens_dir = ENSEMBLE.dir(cfg)
    ens = storage.read_json(storage.join(ens_dir, "metrics.json"))
    summ, best = ens["summary"], ens["best_member"]["name"]  # the ensemble stage names its best member
    desc = storage.read_json(storage.join(ens_dir, "ensemble.json"))
    pixels = next(m["name"] for m in desc["sklearn_members"] if m["features"] == "pixels")
    members = storage.read_json(storage.join(TUNE.dir(cfg), "members.json"))["members"]
    searched = test_accuracy(members[0]["dir"])
    served = next(r for r in storage.read_json(COMPRESS.metrics_path(cfg))
                  ["variants"] if r["variant"] == cfg.compress.serve_variant)
    points = lambda a, b: None if a is None or b is None else 100 * (a - b)  # noqa: E731
    values = {
        "transfer_vs_scratch": (points(searched, scratch), g.transfer_vs_scratch_points),
        "transfer_vs_pixels": (points(searched, summ[pixels]["accuracy"]["mean"]), g.transfer_vs_pixels_points),
        "searched_vs_seed": (points(searched, ft), g.searched_vs_seed_points),
        "stack_vs_best_member": (points(summ["stack"]["accuracy"]["mean"], summ[best]["accuracy"]["mean"]),
                                 g.stack_vs_best_member_points),
        "served_accuracy": (served["accuracy_delta_points"], g.served_accuracy_points),
        "served_size": (served["smaller_raw"], g.served_smaller),
        "served_speed": (served["speedup_b1"], g.served_faster),
    }
    return {k: (v, None if v is None else round(v, 6) >= goal) for k, (v, goal) in values.items()}


def check_report_page(browser, index: str, cfg) -> dict[str, str]:
    """Open ``index`` as a person would: every plot loaded (no broken image), the verdict table as the stage files
    say, the verdict within the first screen; screenshots written to ``report/screenshots/``. Returns their paths."""
    from selenium.webdriver.common.by import By

    from conftest import SCREEN

    browser.get(Path(index).as_uri())
    images = browser.find_elements(By.TAG_NAME, "img")
    assert images, "the report shows no plot"
    for img in images:
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img), \
            f"broken image {img.get_attribute('src')}"
    want = expected_verdict(cfg)
    rows = browser.find_elements(By.CSS_SELECTOR, "#verdict-table tbody tr")
    assert [r.get_attribute("data-key") for r in rows] == list(want)
    for r in rows:
        value, met = want[r.get_attribute("data-key")]
        cells = [c.text for c in r.find_elements(By.TAG_NAME, "td")]
        if value is None:
            assert cells[3] == "-" and cells[6] == "not run", cells
            continue
        unit_x = r.get_attribute("data-key") in ("served_size", "served_speed")
        assert cells[3].startswith(f"{value:.2f}x" if unit_x else f"{value:+.2f} points"), cells
        assert cells[6] == ("met" if met else "missed"), cells
    browser.execute_script("window.scrollTo(0, 0)")
    for selector in ("#verdict", ".verdict-lines", "#verdict-table"):
        box = browser.execute_script("const r = document.querySelector(arguments[0]).getBoundingClientRect();"
                                     "return [r.left, r.top, r.right, r.bottom]", selector)
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= SCREEN[0] and box[3] <= SCREEN[1], (selector, box)
    shots = Path(index).parent / "screenshots"
    shots.mkdir(exist_ok=True)
    first = shots / "report_first_screen.png"
    assert browser.save_screenshot(str(first))
    height = browser.execute_script("return document.documentElement.scrollHeight")
    size = browser.get_window_size()
    try:
        browser.set_window_size(size["width"], size["height"] + height - SCREEN[1])
        whole = shots / "report_full_page.png"
        assert browser.save_screenshot(str(whole))
    finally:
        browser.set_window_size(size["width"], size["height"])
    return {"first_screen": str(first), "full_page": str(whole)}
