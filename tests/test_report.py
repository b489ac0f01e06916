"""The run report on run folders written in the real formats (no Ray): the verdict first, each row against the
config's goals and the files it reads; every section drawn from real files, missing stages named as "not run", an
empty run folder, and an unreadable stage output shown rather than raised. The run folders come from
tests/_report_helpers.py (the producers' own functions where that is cheap).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _report_helpers as H
from conftest import smoke_config
from transfuse import metrics as tm
from transfuse import storage
from transfuse.ensemble import ENSEMBLE
from transfuse.finetune import FINETUNE, TUNE
from transfuse.report import verdict, verdict_lines, write_report

SECTIONS = ("Verdict", "1. Learning curves", "2. Val accuracy against unfreeze depth", "3. Transfer vs scratch",
            "4. Every member vs the ensemble", "5. Confusion matrix and reliability", "6. Compression",
            "6b. Distillation", "7. Precision and recall per class", "8. Pipeline summary", "Appendix")
KEYS = ("Verdict", "1", "2", "3", "4", "5", "6", "6b", "7", "8", "Appendix")  # what _sections keys them by


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return H.digits()


@pytest.fixture(scope="module")
def full(tmp_path_factory, digits) -> tuple[object, H.FullRun, str]:
    """(config, the stage files, index.html) of one run folder with every stage, written once for the module;
    tests that change it work on a copy."""
    cfg = smoke_config(tmp_path_factory.mktemp("runs"), "full")
    run = H.write_full_run(cfg, digits)
    return cfg, run, write_report(cfg)


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
    """Section key ("Verdict", "1" .. "8", "Appendix") -> its HTML (up to the next heading), in page order."""
    parts = re.split(r"<h2[^>]*>", text)[1:]
    out = {}
    for part in parts:
        title = part.split("</h2>")[0]
        out[KEYS[next(i for i, s in enumerate(SECTIONS) if title.startswith(s))]] = part
    assert list(out) == list(KEYS)
    return out


def verdict_rows(section: str) -> dict[str, dict[str, str]]:
    """The verdict table's rows from the HTML: key -> its data attributes and cells."""
    out = {}
    for attrs, cells in re.findall(r"<tr (data-key=[^>]*)>(.*?)</tr>", section):
        d = dict(re.findall(r'data-([a-z]+)="([^"]*)"', attrs))
        d["cells"] = re.findall(r"<td[^>]*>(.*?)</td>", cells)
        out[d["key"]] = d
    return out


def test_full_run_report(full):
    cfg, run, index = full
    ft, scratch, rows, ens, comp = run.finetune, run.scratch, run.tune_rows, run.ensemble, run.compress
    text = _html(index)
    images = _check_images(index)
    assert images == sorted(["learning_curves.png", "val_accuracy_vs_depth.png", "transfer_vs_scratch.png",
                             "members_vs_ensemble.png", "confusion_ensemble.png", "reliability.png",
                             "compression.png"])
    sec = _sections(text)
    assert "not run" not in text and "could not be drawn" not in text
    # the verdict: a row per comparison, its difference and met/missed as computed here from the files
    want = H.expected_verdict(cfg)
    got = verdict_rows(sec["Verdict"])
    assert list(got) == list(want)
    for key, (value, met) in want.items():
        assert float(got[key]["difference"]) == pytest.approx(value, abs=1e-9), key
        assert got[key]["met"] == ("met" if met else "missed"), key
        assert got[key]["cells"][5] == "1"  # draws: this run's own files
    n_met = sum(met for _, met in want.values())
    assert f"{n_met} of 7 goals met (1 draw; labels: train 700, val 250, holdout 350)." in sec["Verdict"]
    missed = [k for k, (_, met) in want.items() if not met]
    assert ("Missed: " in sec["Verdict"]) == bool(missed)
    # the appendix: run name, config fingerprint, the git commit the manifests recorded, package versions
    assert "full" in text and cfg.fingerprint() in sec["Appendix"]
    commit = storage.read_manifest(ENSEMBLE.dir(cfg))["git_commit"]
    if commit:
        assert commit in sec["Appendix"]
    ray_version = storage.read_manifest(ENSEMBLE.dir(cfg))["versions"]["ray"]
    assert f"<td>ray</td><td>{ray_version}</td>" in sec["Appendix"]
    # 1: the best trial is the first entry of members.json; its phases are named and the boundary is drawn
    best = storage.read_json(storage.join(TUNE.dir(cfg), "members.json"))["members"][0]
    s1 = sec["1"]
    assert best["name"] in s1 and "frozen: 3 epoch(s), unfrozen: 2 epoch(s)" in s1
    best_m = storage.read_json(storage.join(best["dir"], "metrics.json"))
    assert f"{best_m['test']['accuracy']:.4f}" in s1
    # 2: a table row per trial, the tune stage's own plot copied byte for byte
    for r in rows:
        assert r["trial_id"] in sec["2"]
    tune_png = Path(TUNE.dir(cfg)) / "val_accuracy_vs_depth.png"
    assert (Path(index).parent / "val_accuracy_vs_depth.png").read_bytes() == tune_png.read_bytes()
    # 3: both test accuracies
    for m in (ft, scratch):
        assert f"{m['metrics']['test']['accuracy']:.4f}" in sec["3"]
    # 4: every member and combiner with its mean accuracy and ECE
    s4 = sec["4"]
    for model, s in ens["summary"].items():
        assert f"<td>{model}</td>" in s4
        assert f"{s['accuracy']['mean']:.4f}" in s4 and f"{s['ece']['mean']:.4f}" in s4
    assert ens["best_member"]["name"] in s4
    order = storage.read_json(storage.join(ENSEMBLE.dir(cfg), "ensemble.json"))["member_order"]
    expected = order + ["average", "hard_vote", "greedy", "stack"]  # members in the ensemble's order, then combiners
    positions = [s4.index(f"<td>{m}</td>") for m in expected]
    assert positions == sorted(positions) and len(expected) == len(ens["summary"])
    # 5: the reliability diagram is the served stack's; its temperature's check (2 folds of these few holdout
    # rows) rejected it, and the caption says so
    cal = ens["calibration"]["0"]
    assert not cal["applied"] and "before temperature scaling" not in sec["5"]
    assert f"temperature {cal['fitted_temperature']:.3f} fitted" in sec["5"] and "not applied" in sec["5"]
    assert _reliability_nlls(sec["5"]) == pytest.approx([cal["test"]["after"]["nll"]], abs=2e-4)
    # 6: a row per variant with its size and accuracy; the members left out at zero stacker weight are named
    s6 = sec["6"]
    assert "zero stacker weight" in s6 and "svc_on_cnn, cnn_u2" in s6
    for r in comp["variants"]:
        assert f"<td>{r['variant']}</td>" in s6
        assert f"{r['size_bytes']:,}" in s6 and f"{r['accuracy']:.4f}" in s6
    # 8: the pipeline's own summary rows
    assert "stacked ensemble" in sec["8"] and "same network from scratch" in sec["8"]


def _reliability_nlls(section: str) -> list[float]:
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", section)]
    return [float(r[2]) for r in cells if r and r[0].startswith("stacked ensemble")]


def test_an_applied_temperature_is_drawn_before_and_after(tmp_path, digits):
    """``ensemble.temperature_check: false``: the fitted temperature is served, and the reliability diagram has the
    stack before and after it, with both NLLs."""
    cfg = smoke_config(tmp_path, "applied")
    H.write_full_run(cfg, digits, temperature_check=False)
    sec = _sections(_html(write_report(cfg)))
    cal = storage.read_json(ENSEMBLE.metrics_path(cfg))["calibration"]["0"]
    assert cal["applied"] and cal["temperature"] == cal["fitted_temperature"] != 1.0
    assert "stacked ensemble, before temperature scaling" in sec["5"] and f"T = {cal['temperature']:.3f}" in sec["5"]
    assert _reliability_nlls(sec["5"]) == pytest.approx([cal["test"]["before"]["nll"], cal["test"]["after"]["nll"]],
                                                        abs=2e-4)


def test_per_class_table_float32_vs_int8(full, digits):
    """Section 7 runs both bundles on the prepared test split: its cells are scikit-learn's precision and recall of
    numpy's own predictions with the float32 and the int8 weights."""
    from sklearn.metrics import precision_score, recall_score

    _, run, index = full
    sec = _sections(_html(index))["7"]
    x, y, _ = digits["test"]
    pred = {q: run.linear.probs(x, quantized=q).argmax(1) for q in (False, True)}
    rows = re.findall(r"<tr><td>(digit_\d)</td>(.*?)</tr>", sec)
    assert [r[0] for r in rows] == H.CLASS_NAMES
    for k, (_, cells) in enumerate(rows):
        c = re.findall(r"<td>(.*?)</td>", cells)
        assert c[0] == str(int((y == k).sum()))
        for offset, score in ((1, precision_score), (4, recall_score)):
            f32, i8 = (float(score(y, pred[q], labels=[k], average=None, zero_division=np.nan)[0]) for q in
                       (False, True))
            assert c[offset] == f"{f32:.4f}" and c[offset + 1] == f"{i8:.4f}", (k, offset)
            assert c[offset + 2] == f"{100 * (i8 - f32):+.2f}"


def test_stack_recall_per_class_by_class_name(full, digits):
    """Section 5 lists the stacked ensemble's test recall per class by class name beside the best member's (the
    ensemble's metrics.json, first seed) with its balanced accuracy and macro F1 and the run's class weighting;
    section 4 shows every model's balanced accuracy; section 7 the bundles' balanced accuracy and macro F1."""
    _, run, index = full
    sec = _sections(_html(index))
    ens = run.ensemble
    first = next(iter(ens["test"].values()))
    stack, best = first["stack"], first[ens["best_member"]["name"]]
    rows = re.findall(r"<tr><td>(digit_\d)</td>(.*?)</tr>", sec["5"])
    assert [r[0] for r in rows] == H.CLASS_NAMES
    support = np.asarray(ens["confusion_stack"]).sum(1)
    for k, (name, cells) in enumerate(rows):
        c = re.findall(r"<td>(.*?)</td>", cells)
        assert c == [str(int(support[k])), f"{stack['per_class_recall'][name]:.4f}",
                     f"{best['per_class_recall'][name]:.4f}"]  # no weight column: the run did not weight
    assert f"balanced accuracy {stack['balanced_accuracy']:.4f}, macro F1 {stack['macro_f1']:.4f}" in sec["5"]
    assert "Class weights: off: every loss unweighted." in sec["5"]
    assert f"{ens['summary']['stack']['balanced_accuracy']['mean']:.4f}" in sec["4"]
    x, y, _ = digits["test"]
    for q in (False, True):
        p = run.linear.probs(x, quantized=q)
        assert f"{tm.balanced_accuracy(p, y):.4f} and {tm.macro_f1(p, y):.4f}" in sec["7"]


def test_a_weighted_stack_shows_its_class_weights(tmp_path, full):
    """An ensemble that weighted by class: section 5 adds the stacker's weight per class and says why it weighted."""
    import shutil

    shutil.copytree(storage.run_dir(full[0]), tmp_path / "full")
    cfg = smoke_config(tmp_path, "full")
    path = ENSEMBLE.metrics_path(cfg)
    ens = storage.read_json(path)
    weights = {n: 0.5 + k / 10 for k, n in enumerate(H.CLASS_NAMES)}
    ens["class_weight"] = {"mode": "auto", "imbalance_ratio": 2.0, "train_imbalance": 3.5, "on": True,
                           "stacker": weights, "sklearn_final": weights}
    storage.write_json(path, ens)
    s5 = _sections(_html(write_report(cfg)))["5"]
    rows = dict(re.findall(r"<tr><td>(digit_\d)</td>(.*?)</tr>", s5))
    assert [re.findall(r"<td>(.*?)</td>", rows[n])[-1] for n in H.CLASS_NAMES] == [
        f"{w:.3f}" for w in weights.values()]
    assert ("Class weights: on (data.class_weight auto, train split imbalance 3.50 (largest / smallest class) "
            "against the threshold 2)") in s5


def test_goals_come_from_the_config(full):
    """The same run judged against other goals: the int8 size row flips with goals.served_smaller."""
    cfg, run, _ = full
    ratio = next(r for r in run.compress["variants"] if r["variant"] == "int8")["smaller_raw"]
    rows = {}
    for goal in (ratio * 0.9, ratio * 1.1):
        c = smoke_config(Path(cfg.storage), cfg.run, [f"goals.served_smaller={goal}"])
        rows[goal] = next(r for r in verdict(c).rows if r.key == "served_size")
    assert [r.met for r in rows.values()] == [True, False]
    assert all(r.difference == pytest.approx(ratio) for r in rows.values())
    lines = verdict_lines(smoke_config(Path(cfg.storage), cfg.run, [f"goals.served_smaller={ratio * 1.1}"]))
    assert any(line.split()[:1] == ["missed"] and "size" in line for line in lines)
    assert lines[-1] == "note: left out of every compressed variant (zero stacker weight): svc_on_cnn, cnn_u2"


def test_verdict_judges_pixels_on_the_same_labels(tmp_path, full):
    """The scratch stage's same-labels pixel baseline (transfer_vs_scratch.json's pixels_logreg: train, C on val)
    is the pixels row when present; without it the row falls back to the ensemble's pixel member."""
    import shutil

    from transfuse.finetune.baselines import TRANSFER_FILE

    shutil.copytree(storage.run_dir(full[0]), tmp_path / "full")
    cfg = smoke_config(tmp_path, "full")
    before = next(r for r in verdict(cfg).rows if r.key == "transfer_vs_pixels")
    assert "pixels (" in before.second  # the ensemble's pixel member
    storage.write_json(storage.join(storage.run_dir(cfg), TRANSFER_FILE),
                       {"pixels_logreg": {"accuracy": 0.25, "nll": 2.0, "ece": 0.1, "n": 10, "C": 0.1}})
    row = next(r for r in verdict(cfg).rows if r.key == "transfer_vs_pixels")
    searched = next(r for r in verdict(cfg).rows if r.key == "searched_vs_seed")
    assert row.second == "pixels logreg (train, C on val) 0.2500"
    assert row.first == searched.first and row.difference == pytest.approx(
        100 * (float(row.first.split()[-1]) - 0.25), abs=0.01)  # (the cell shows 4 digits)


def test_verdict_reads_bench_draws(tmp_path, full, digits):
    """bench_transfer.json (bench/transfer.py's format): rows it has both models for use its draws, paired by draw;
    the rest stay on the run's files; its label budget is shown, unless the data manifest has its own."""
    import shutil

    shutil.copytree(storage.run_dir(full[0]), tmp_path / "full")  # members.json still names the original trials
    cfg = smoke_config(tmp_path, "full")
    acc = {"pixels_logreg": [0.80, 0.82, 0.78], "scratch": [0.60, 0.70, 0.65], "frozen_logreg": [0.85, 0.86, 0.84],
           "seed_recipe": [0.90, 0.88, 0.91], "searched_depth": [0.91, 0.87, 0.93], "stack": [0.92, 0.90, 0.94]}
    bench = {"label_budget": {"per_class": 50, "train": 500, "val": 100, "holdout": 200}, "draws": [0, 1, 2],
             "models": {k: {"accuracy": v, "nll": [0.5] * 3} for k, v in acc.items()}, "summary": {}}
    storage.write_json(storage.join(storage.run_dir(cfg), "bench_transfer.json"), bench)
    v = verdict(cfg)
    rows = {r.key: r for r in v.rows}
    for key, a, b in (("transfer_vs_scratch", "searched_depth", "scratch"), ("transfer_vs_pixels", "searched_depth",
                      "pixels_logreg"), ("searched_vs_seed", "searched_depth", "seed_recipe"),
                      ("stack_vs_best_member", "stack", "searched_depth")):  # best non-stack model: searched_depth
        diffs = 100 * (np.array(acc[a]) - np.array(acc[b]))
        assert rows[key].draws == 3 and rows[key].difference == pytest.approx(diffs.mean()), key
        assert rows[key].worst == pytest.approx(diffs.min()), key
    assert rows["served_size"].draws == 1  # compress is not in the bench: the run's own measurement
    assert "(1/3 draws; label budget: 50 labelled per class, train 500, val 100, holdout 200)" in v.headline()
    sec = _sections(_html(write_report(cfg)))["Verdict"]
    assert "seed recipe 0.8967 [0.8800, 0.9100]" in sec and "bench_transfer.json" in sec

    H.write_data(cfg, digits, label_budget={"per_class": 70, "train": 700, "val": 250, "holdout": 350})
    assert "label budget: 70 labelled per class, train 700" in verdict(cfg).headline()


def test_partial_run_names_missing_stages(tmp_path, digits):
    """finetune and a tune without its plot: the report draws the depth plot itself and names the missing stages;
    a rerun replaces the earlier report's files."""
    cfg = smoke_config(tmp_path, "partial")
    H.write_member(cfg, FINETUNE.dir(cfg), digits, seed=3, epochs=(2, 0))
    index = write_report(cfg)
    sec = _sections(_html(index))
    assert "the seed&#x27;s fixed-depth model" in sec["1"] and "one phase only" in sec["1"]
    assert "stage tune not run" in sec["2"]
    assert "stage scratch not run" in sec["3"] and "stage finetune not run" not in sec["3"]
    assert "stage ensemble not run" in sec["4"]
    assert "stage ensemble not run" in sec["5"] and "reliability.png" in sec["5"]
    assert "stage compress not run" in sec["6"]
    assert sorted(_check_images(index)) == ["learning_curves.png", "reliability.png", "transfer_vs_scratch.png"]

    H.write_tune(cfg, digits, plot=False)
    index = write_report(cfg)
    sec = _sections(_html(index))
    assert "not run" not in sec["2"] and "written by the tune stage" not in sec["2"]
    assert "val_accuracy_vs_depth.png" in _check_images(index)


def test_empty_run_every_section_not_run(tmp_path):
    cfg = smoke_config(tmp_path, "empty")
    index = write_report(cfg)
    text = _html(index)
    assert _check_images(index) == []
    sec = _sections(text)
    for key in KEYS[:-1]:  # the appendix lists manifests: none
        assert "not run" in sec[key] or (key == "6b" and "distill: off" in sec[key]), key  # smoke: no distill
    assert "no stage has written a manifest yet" in text and "could not be drawn" not in text


def test_command_line_writes_the_report(tmp_path, capsys):
    from conftest import ROOT
    from transfuse.report import main

    assert main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"storage={tmp_path}",
                 "--set", "run=cli"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(tmp_path / "cli" / "report" / "index.html") and "<h2>8. Pipeline summary</h2>" in _html(path)


def test_unreadable_stage_output_is_shown_not_raised(tmp_path, digits):
    """An ensemble metrics.json without its summary: that section names the error, the others are still drawn."""
    cfg = smoke_config(tmp_path, "broken")
    H.write_member(cfg, FINETUNE.dir(cfg), digits, seed=5)
    storage.write_json(ENSEMBLE.metrics_path(cfg), {"seeds": [0]})
    index = write_report(cfg)
    sec = _sections(_html(index))
    assert "could not be drawn: KeyError" in sec["4"] and "summary" in sec["4"]
    assert "stage ensemble not run" in sec["5"]  # no confusion matrix in it
    assert "learning_curves.png" in _check_images(index)


def test_seed_range_of_equal_values_draws(tmp_path):
    """Three seeds with the same accuracy: np.mean([0.1] * 3) is one ulp above 0.1, which once made a negative
    error bar and cost the default run's report its 'members vs ensemble' plot."""
    cfg = smoke_config(tmp_path, "equal")
    values = [0.1, 0.1, 0.1]
    assert float(np.mean(values)) > min(values)  # the rounding this test is about
    stat = {"mean": float(np.mean(values)), "min": min(values), "max": max(values), "values": values}
    summary = {m: {"accuracy": stat, "nll": stat, "ece": stat} for m in ("logreg", "average", "stack")}
    storage.write_json(ENSEMBLE.metrics_path(cfg),
                       {"seeds": [0, 1, 2], "summary": summary})
    sec = _sections(_html(write_report(cfg)))
    assert "members_vs_ensemble.png" in sec["4"] and "could not be drawn" not in sec["4"]
