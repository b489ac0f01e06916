"""The report's sections, each drawn on a ``transfuse.report.page.Page`` from the files its stage wrote (a stage
that has not run gives "stage X not run"): the title, the verdict (section 0, rows from
``transfuse.report.judge``), 1. learning curves of the best trial, 2. val accuracy against unfreeze depth,
3. transfer vs scratch, 4. every member vs the ensemble (with balanced accuracy and macro F1), 5. the confusion
matrix, recall per class of the stacked ensemble (by class name, with the run's class weights) and the reliability
diagram, 6. the compression table, 7. precision and recall per class (``per_class``), float32 vs the served
variant, with their balanced accuracy and macro F1, and
the appendix (storage, fingerprints, stage manifests, git commits, the label budget record, package versions).
Section 8, the pipeline summary, is ``transfuse.report.pipeline_summary``'s."""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any, Optional

import numpy as np

from transfuse import storage
from transfuse.compress import BUNDLE, COMPRESS
from transfuse.data import PREPARE
from transfuse.ensemble import COMBINERS, ENSEMBLE, temperature_line
from transfuse.finetune import FINETUNE, PRETRAIN, PRETRAIN_DATA, SCRATCH, TUNE, MemberMetrics
from transfuse.report.judge import BENCH_FILE, read_json, verdict
from transfuse.report.page import Page, esc, not_run, num, pyplot, reliability_figure, table
from transfuse.report.pipeline_summary import tuned_members
from transfuse.stage import read_metrics

# Folders whose manifest.json is listed in the appendix (fingerprint, creation time, git commit).
MANIFEST_FOLDERS = (PREPARE, PRETRAIN_DATA, PRETRAIN, FINETUNE, SCRATCH, TUNE, ENSEMBLE, COMPRESS, BUNDLE)


def _member_dir(cfg: Any) -> tuple[Optional[str], str]:
    """(dir of the best trial's member, how it was found): tune/members.json's first entry, else finetune/."""
    tuned = tuned_members(cfg)
    if tuned:
        return tuned[0].dir, f"best tuned trial {tuned[0].name} (first entry of tune/members.json)"
    ft = FINETUNE.dir(cfg)
    if read_metrics(ft) is not None:
        return ft, "the seed's fixed-depth model (finetune/; tune not run)"
    return None, ""


# ------------------------------------------------------------------------------------------------ sections
def title(cfg: Any, page: Page) -> None:
    page.add(f"<h1>transfuse run <code>{esc(cfg.run)}</code></h1>")


def verdict_section(cfg: Any, page: Page) -> None:
    page.add('<h2 id="verdict">Verdict</h2>')
    v = verdict(cfg)
    page.add('<div class="verdict-lines">' + "".join(f"<p>{esc(line)}</p>" for line in v.lines()) + "</div>")
    head = "".join(f"<th>{h}</th>" for h in ("comparison", "first", "second", "difference", "goal", "draws",
                                            "verdict"))
    body = "".join(
        f'<tr data-key="{esc(r.key)}" data-met="{esc(r.verdict_text())}"'
        f' data-difference="{"" if r.difference is None else repr(r.difference)}">'
        f"<td>{esc(r.comparison)}</td><td>{esc(r.first)}</td><td>{esc(r.second)}</td>"
        f"<td>{esc(r.difference_text())}</td><td>{esc(r.goal_text())}</td>"
        f"<td>{r.draws if r.met is not None else '-'}</td>"
        f'<td class="{esc(r.verdict_text().replace(" ", "-"))}">{esc(r.verdict_text())}</td></tr>'
        for r in v.rows)
    page.add(f'<table id="verdict-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
    src = (f"Rows with several draws read {BENCH_FILE} (bench/transfer.py); the others this run's files."
           if v.bench else "Every row reads this run's files (1 draw; bench/transfer.py writes several).")
    page.add(f'<p class="note">{esc(src)} Goals: the config\'s <code>goals</code> section. Accuracy on the '
             "test split; a difference is the first model minus the second.</p>")


def _versions(manifests: list[dict]) -> list[tuple[str, str]]:
    """Package versions as the stage manifests recorded them (a package whose version changed between stages
    lists each), else this process's; and the Python that writes the report."""
    import platform

    seen: dict[str, list[str]] = {}
    for m in manifests or [{"versions": storage.versions()}]:
        for k, v in (m.get("versions") or {}).items():
            if v not in seen.setdefault(k, []):
                seen[k].append(v)
    return [(k, ", ".join(v)) for k, v in seen.items()] + [("python (report)", platform.python_version())]


def appendix(cfg: Any, page: Page) -> None:
    page.add('<h2 id="appendix">Appendix: paths, fingerprints and versions</h2>')
    rows, commits, manifests = [], [], []
    for s in MANIFEST_FOLDERS:
        m = storage.read_manifest(s.dir(cfg))
        if not m:
            continue
        manifests.append(m)
        commit = m.get("git_commit")
        if commit and commit not in commits:
            commits.append(commit)
        rows.append([esc(s), num(m.get("complete")), f"<code>{esc(m.get('fingerprint', '-'))}</code>",
                     esc(m.get("created", "-")), f"<code>{esc((commit or '-')[:12])}</code>"])
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info = [("storage", storage.run_dir(cfg)), ("config fingerprint", cfg.fingerprint()),
            ("git commit", ", ".join(commits) if commits else "- (no stage manifest records one)"),
            ("backbone", f"{cfg.model.backbone} (width {cfg.model.width}, {cfg.model.input_size} px, "
                         f"weights {cfg.model.weights}, unfreeze {cfg.model.unfreeze})"),
            ("written", now)]
    data = storage.read_manifest(PREPARE.dir(cfg)) or {}
    if data.get("label_budget"):
        info.append(("label budget (data manifest)", json.dumps(data["label_budget"], sort_keys=True)))
    page.add(table(["", ""], [[esc(k), f"<code>{esc(v)}</code>"] for k, v in info]))
    page.add("<h3>Stage manifests</h3>")
    page.add(table(["stage", "complete", "fingerprint", "created", "git commit"], rows) if rows
             else "<p>no stage has written a manifest yet</p>")
    page.add("<h3>Package versions</h3>")
    page.add(table(["package", "version"], [[esc(k), esc(v)] for k, v in _versions(manifests)]))


def learning_curves(cfg: Any, page: Page) -> None:
    page.add("<h2>1. Learning curves of the best trial</h2>")
    d, how = _member_dir(cfg)
    if d is None:
        page.add(not_run("tune", "finetune"))
        return
    m = MemberMetrics.read(d)
    hist = m.history
    if not hist:
        page.add(f"<p>{esc(d)}/metrics.json has no per-epoch history</p>")
        return
    plt = pyplot()
    epochs = [int(r["epoch"]) for r in hist]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "loss", "loss (cross-entropy)"), (axes[1], "accuracy", "accuracy")):
        for k, style in ((key, "o-"), (f"val_{key}", "s--")):
            pts = [(e, r[k]) for e, r in zip(epochs, hist) if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=k.replace("_", " "), ms=4)
        ax.set_xlabel("epoch (both phases)")
        ax.set_ylabel(label)
    phases = [r.get("phase") for r in hist]
    boundary = next((i for i in range(1, len(phases)) if phases[i] != phases[i - 1]), None)
    for ax in axes:
        if boundary is not None:  # between the last epoch of one phase and the first of the next
            x = (epochs[boundary - 1] + epochs[boundary]) / 2
            ax.axvline(x, color="grey", ls=":", lw=1.5, label=f"{phases[boundary - 1]} -> {phases[boundary]}")
        ax.legend(fontsize=8)
    axes[0].set_title("loss")
    axes[1].set_title("accuracy")
    per_phase = ", ".join(f"{p}: {phases.count(p)} epoch(s)" for p in dict.fromkeys(phases))
    caption = (f"{esc(how)}. Phases: {esc(per_phase)}"
               + ("; the dotted line marks where the backbone was unfrozen." if boundary is not None
                  else "; one phase only (no boundary)."))
    page.figure(fig, "learning_curves.png", "learning curves", caption)
    rows = [[esc(split), num(t.accuracy), num(t.nll), num(t.ece), num(t.n), num(t.balanced_accuracy),
             num(t.macro_f1)] for split, t in (("val", m.val), ("test", m.test), ("holdout", m.holdout)) if t]
    if rows:
        page.add(table(["split", "accuracy", "NLL", "ECE", "n", "balanced accuracy", "macro F1"], rows))


def depth_search(cfg: Any, page: Page) -> None:
    page.add("<h2>2. Val accuracy against unfreeze depth</h2>")
    tune_dir = TUNE.dir(cfg)
    rows = read_json(storage.join(tune_dir, "results.json"))
    if rows is None:
        page.add(not_run("tune"))
        return
    tune_png = storage.join(tune_dir, "val_accuracy_vs_depth.png")
    caption = (f"Best val accuracy of every trial by the number of unfrozen backbone layers; crosses were stopped "
               f"early by the scheduler; dashed line: the seed's depth ({cfg.model.unfreeze}).")
    if storage.exists(tune_png):  # the search's own plot, copied so the page works from its folder
        page.image_bytes(storage.read_bytes(tune_png), "val_accuracy_vs_depth.png", "val accuracy vs depth",
                         caption + " (plot written by the tune stage)")
    else:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for stopped in (False, True):
            pts = [(r["unfreeze"], r["best_val_accuracy"]) for r in rows if bool(r.get("stopped_early")) == stopped
                   and r.get("best_val_accuracy") is not None and not math.isnan(r["best_val_accuracy"])]
            if pts:
                ax.scatter(*zip(*pts), marker="x" if stopped else "o",
                           label="stopped early" if stopped else "ran to the end", alpha=0.8)
        ax.axvline(cfg.model.unfreeze, color="grey", ls="--", lw=1, label=f"seed's depth ({cfg.model.unfreeze})")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths are layer counts
        ax.set_xlabel("unfrozen backbone layers (from the top)")
        ax.set_ylabel("best val accuracy")
        ax.set_title("Depth search")
        ax.legend(fontsize=8)
        page.figure(fig, "val_accuracy_vs_depth.png", "val accuracy vs depth", caption)
    ordered = sorted(rows, key=lambda r: (r.get("unfreeze", 0), -(r.get("best_val_accuracy") or 0.0)))
    page.add(table(
        ["trial", "unfreeze", "best val acc", "epochs", "stopped early", "finished", "member val acc",
         "member test acc", "error"],
        [[esc(r.get("trial_id", "-")), num(r.get("unfreeze")), num(r.get("best_val_accuracy")),
          num(r.get("epochs_run")), num(r.get("stopped_early")), num(r.get("finished")),
          num(r.get("val_accuracy")), num(r.get("test_accuracy")), esc(r.get("error") or "")] for r in ordered]))


def transfer_vs_scratch(cfg: Any, page: Page) -> None:
    page.add("<h2>3. Transfer vs scratch</h2>")
    found, missing = {}, []
    for stage, label in ((FINETUNE, f"transferred weights ({cfg.model.weights}), unfreeze {cfg.model.unfreeze}"),
                         (SCRATCH, "same network from random weights")):
        m = stage.read(cfg)
        if m is None or m.test is None:
            missing.append(stage.name)
        else:
            found[stage.name] = (label, m.test, m.epochs)
    page.add(not_run(*missing))
    if not found:
        return
    page.add(table(["stage", "model", "test accuracy", "NLL", "ECE", "n", "epochs"],
                    [[esc(s), esc(lab), num(t.accuracy), num(t.nll), num(t.ece), num(t.n), num(ep)]
                     for s, (lab, t, ep) in found.items()]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    names = list(found)
    x = np.arange(len(names))
    w = 0.38
    for i, (key, label) in enumerate((("accuracy", "test accuracy"), ("ece", "test ECE"))):
        vals = [float(getattr(found[s][1], key)) for s in names]
        bars = ax.bar(x + (i - 0.5) * w, vals, w, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(x, [f"{s}\n({'transfer' if s == 'finetune' else 'random init'})" for s in names])
    ax.set_ylim(0, 1.1)
    ax.set_title("Transfer vs scratch (test split)")
    ax.legend(fontsize=8)
    page.figure(fig, "transfer_vs_scratch.png", "transfer vs scratch",
                "Same architecture and epoch budget; higher accuracy and lower ECE are better.")


def members_vs_ensemble(cfg: Any, page: Page, ens: Optional[dict], desc: Optional[dict]) -> None:
    page.add("<h2>4. Every member vs the ensemble</h2>")
    if ens is None:
        page.add(not_run("ensemble"))
        return
    per_model = ens["summary"]
    # metrics.json is written with sorted keys: restore the ensemble's member order, then the combiners
    order = [m for m in (desc or {}).get("member_order", []) if m in per_model]
    models = order + sorted((m for m in per_model if m not in order and m not in COMBINERS), key=str) \
        + [c for c in COMBINERS if c in per_model]
    seeds = ens.get("seeds", [])
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.45 * len(models) + 1.4), sharey=True)
    y = np.arange(len(models))
    colors = ["tab:orange" if m in COMBINERS else "tab:blue" for m in models]
    for ax, metric, label in ((axes[0], "accuracy", "test accuracy (higher is better)"),
                              (axes[1], "ece", "test ECE (lower is better)")):
        mean = np.array([per_model[m][metric]["mean"] for m in models])
        # clipped: the mean of equal seed values can round one ulp above their min, and matplotlib refuses a
        # negative error bar (it did, in a default run where a member gave the same accuracy on every seed)
        lo = np.clip(mean - np.array([per_model[m][metric]["min"] for m in models]), 0.0, None)
        hi = np.clip(np.array([per_model[m][metric]["max"] for m in models]) - mean, 0.0, None)
        ax.barh(y, mean, color=colors, xerr=[lo, hi] if len(seeds) > 1 else None, capsize=3)
        for yi, v in zip(y, mean):
            ax.text(v, yi, f" {v:.3f}", va="center", fontsize=8)
        ax.set_xlabel(label)
        ax.set_xlim(0, max(1.0, float(mean.max()) * 1.2) if metric == "accuracy" else float(mean.max()) * 1.35 + 1e-3)
    axes[0].set_yticks(y, models)
    axes[0].invert_yaxis()
    from matplotlib.patches import Patch

    axes[1].legend(handles=[Patch(color="tab:blue", label="member"), Patch(color="tab:orange", label="combiner")],
                   fontsize=8, loc="lower right")
    page.figure(fig, "members_vs_ensemble.png", "members vs ensemble",
                f"Test split, mean over {len(seeds) or 1} ensemble seed(s)"
                + ("; error bars span the seed range." if len(seeds) > 1 else "."))
    rows = []
    for m in models:
        s = per_model[m]
        # (balanced accuracy and macro F1: '-' in a report of an ensemble fitted before they were recorded)
        cell = lambda k: (f"{num(s[k]['mean'])} [{num(s[k]['min'])}, {num(s[k]['max'])}]"  # noqa: E731
                          if k in s else "-")
        rows.append([esc(m), "combiner" if m in COMBINERS else "member", cell("accuracy"), cell("nll"),
                     cell("ece"), cell("balanced_accuracy"), cell("macro_f1")])
    page.add(table(["model", "kind", "accuracy mean [min, max]", "NLL", "ECE", "balanced accuracy", "macro F1"],
                   rows))
    best, gain = ens.get("best_member"), ens.get("stack_vs_best_member")
    if best and gain:
        page.add(f"<p>Best single member: <b>{esc(best['name'])}</b> (accuracy {num(best.get('accuracy'))}). "
                 f"Stacked ensemble vs it: accuracy {gain['accuracy_gain_mean']:+.4f}, NLL gain "
                 f"{gain['nll_gain_mean']:+.4f}; beats it on accuracy or NLL: "
                 f"{num(bool(gain['beats_on_accuracy_or_nll']))}.</p>")
    counts = ens.get("counts")
    if counts:
        page.add(f"<p>Examples per split: {esc(', '.join(f'{k} {v}' for k, v in counts.items()))}.</p>")


def _best_cnn_member(cfg: Any, ens: Optional[dict], desc: Optional[dict]) -> tuple[Optional[str], str]:
    """The CNN member with the best test accuracy in the ensemble report, else the best trial / finetune."""
    if ens and desc and desc.get("cnn_members"):
        summary = ens.get("summary", {})
        cnn = [c for c in desc["cnn_members"] if c["name"] in summary] or desc["cnn_members"]
        best = max(cnn, key=lambda c: summary.get(c["name"], {}).get("accuracy", {}).get("mean", -1.0))
        return str(best["dir"]), f"CNN member {best['name']} (best CNN member on test in the ensemble report)"
    return _member_dir(cfg)


def class_weight_line(cw: Optional[dict]) -> str:
    """One sentence for a stage's ``class_weight`` record (``class_weights.decision``, plus the ensemble's)."""
    if not cw or "on" not in cw:
        return "Class weights: not recorded (a run from before class weighting)."
    how = ""
    if cw.get("mode"):
        how = f"data.class_weight {cw['mode']}"
        if cw["mode"] == "auto" and "train_imbalance" in cw:
            how += (f", train split imbalance {cw['train_imbalance']:.2f} (largest / smallest class) against the "
                    f"threshold {cw['imbalance_ratio']:g}")
        how = f" ({how})"
    if not cw["on"]:
        return f"Class weights: off{how}: every loss unweighted."
    return (f"Class weights: on{how}: every learner's loss weighted n / (k n_class) on its own fit labels "
            "(the CNNs on train, the scikit-learn members on train + holdout, the stacker on holdout).")


def stack_per_class(page: Page, ens: dict, names: list[str], support: np.ndarray) -> None:
    """Recall per class of the stacked ensemble (the served combiner) and of the best single member on the test
    split, by class name, with their balanced accuracy and macro F1, from ensemble/metrics.json (first seed), and
    the class weights the stacker was fitted with when the run weighted."""
    seeds = ens.get("test") or {}
    first = next(iter(seeds.values()), None)
    stack = (first or {}).get("stack") or {}
    recall = stack.get("per_class_recall")
    if not recall:
        page.add("<p>ensemble/metrics.json has no recall per class (an ensemble fitted before it was recorded).</p>")
        return
    best = (ens.get("best_member") or {}).get("name")
    best_recall = ((first or {}).get(best) or {}).get("per_class_recall") or {}
    cw = ens.get("class_weight") or {}
    weights = cw.get("stacker") if cw.get("on") else None
    header = (["class", "test n", "recall: stacked ensemble"] + ([f"recall: {best}"] if best_recall else [])
              + (["class weight (stacker)"] if weights else []))
    rows = []
    for k, cname in enumerate(names):
        row = [esc(cname), num(int(support[k])) if k < len(support) else "-", num(recall.get(cname))]
        if best_recall:
            row.append(num(best_recall.get(cname)))
        if weights:
            row.append(num(weights.get(cname), "{:.3f}"))
        rows.append(row)
    page.add("<h3>Recall per class of the stacked ensemble</h3>")
    page.add(table(header, rows))
    seed = next(iter(seeds), "-")
    page.add(f"<p>Test split, ensemble seed {esc(seed)}: stacked ensemble balanced accuracy "
             f"{num(stack.get('balanced_accuracy'))}, macro F1 {num(stack.get('macro_f1'))}, accuracy "
             f"{num(stack.get('accuracy'))}. {esc(class_weight_line(cw))}</p>")


def calibration(cfg: Any, page: Page, ens: Optional[dict], desc: Optional[dict]) -> None:
    page.add("<h2>5. Confusion matrix and reliability</h2>")
    class_names = (desc or {}).get("class_names")
    if ens is None or "confusion_stack" not in ens:
        page.add(not_run("ensemble"))
    else:
        cm = np.asarray(ens["confusion_stack"], dtype=np.int64)
        k = cm.shape[0]
        names = [str(c) for c in class_names] if class_names and len(class_names) == k else [str(i) for i in range(k)]
        plt = pyplot()
        side = min(9.0, 2.5 + 0.45 * k)
        fig, ax = plt.subplots(figsize=(side + 1.0, side))
        im = ax.imshow(cm, cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if k <= 20:  # counts are readable up to ~20 classes
            thresh = cm.max() / 2 if cm.size else 0
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if cm[i, j] > thresh else "black")
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = float(np.trace(cm) / max(cm.sum(), 1))
        ax.set_title(f"Stacked ensemble, test (accuracy {acc:.3f}, n={int(cm.sum())})")
        page.figure(fig, "confusion_ensemble.png", "confusion matrix of the stacked ensemble",
                    "Confusion matrix of the stacked ensemble on the test split (rows: true class, columns: "
                    "predicted), from ensemble/metrics.json.")
        stack_per_class(page, ens, names, cm.sum(1))
    from transfuse.finetune import read_member_split

    ens_dir = ENSEMBLE.dir(cfg)
    curves = []  # (label, probs, labels)
    if storage.exists(storage.join(ens_dir, "predictions", "test.parquet")):
        how, served = "the stacked ensemble, from ensemble/predictions/test*.parquet", "stacked ensemble (served)"
        if storage.exists(storage.join(ens_dir, "predictions", "test_uncalibrated.parquet")):  # temperature-scaled
            t = float((desc or {}).get("stacker", {}).get("temperature", 1.0))
            _, labels, probs = read_member_split(ens_dir, "predictions", "test_uncalibrated")
            curves.append(("stacked ensemble, before temperature scaling", probs, labels))
            served = f"stacked ensemble, T = {t:.3f} (served)"
            how += (f"; the temperature T = {t:.3f} was fitted on the stacker's out-of-fold holdout logits "
                    "(Guo et al. 2017) and divides the served stacker's logits")
        saved = next(iter(((ens or {}).get("calibration") or {}).values()), None)  # the first seed's is saved
        if saved and not saved.get("applied", True):
            how += f"; the stacker's {temperature_line(saved)}"
        _, labels, probs = read_member_split(ens_dir, "predictions", "test")
        curves.append((served, probs, labels))
    else:
        d, how = _best_cnn_member(cfg, ens, desc)
        if d is None or not storage.exists(storage.join(d, "predictions", "test.parquet")):
            page.add("<p>No test predictions to draw a reliability diagram from "
                     "(no ensemble/predictions/test.parquet, no member dir with predictions/test.parquet).</p>")
            return
        _, labels, probs = read_member_split(d, "predictions", "test")
        curves.append((how, probs, labels))
        how += ", from its predictions/test.parquet (the ensemble stage has not saved test probabilities)"
    reliability_figure(page, curves, "reliability.png", how)
