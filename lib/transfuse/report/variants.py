"""Report sections 6-7: the compressed variants, the distilled student, and precision and recall per class of
float32 against the served variant."""

from __future__ import annotations

from typing import Any

import numpy as np

from transfuse import metrics as tm
from transfuse import storage
from transfuse.compress import COMPRESS, served_variant
from transfuse.data import PREPARE
from transfuse.distill import DISTILL
from transfuse.ensemble import ENSEMBLE, temperature_line
from transfuse.report.page import Page, esc, not_run, num, pyplot, reliability_figure, table


def compression(cfg: Any, page: Page) -> None:
    page.add("<h2>6. Compression: size, latency and accuracy per variant</h2>")
    rep = COMPRESS.metrics(cfg)
    if rep is None:
        page.add(not_run("compress"))
        return
    rows = rep.get("variants") or []
    if not rows:
        page.add("<p>compress/metrics.json lists no variants</p>")
        return
    thr_key = next((k for k in rows[0] if k.startswith("throughput_b")), None)
    cols = [("variant", "variant", "{}"), ("size_bytes", "bytes stored", "{}"), ("size_gzip_bytes", "gzip bytes", "{}"),
            ("size_loaded_bytes", "bytes loaded", "{}"),
            ("p50_ms_b1", "p50 ms (batch 1)", "{:.2f}"), ("p99_ms_b1", "p99 ms (batch 1)", "{:.2f}")]
    if thr_key:
        cols.append((thr_key, f"images/s (batch {thr_key[len('throughput_b'):]})", "{:.1f}"))
    cols += [("accuracy", "accuracy", "{:.4f}"), ("nll", "NLL", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
             ("speedup_b1", "x faster", "{:.2f}"), ("smaller_raw", "x smaller (stored)", "{:.2f}"),
             ("smaller_gzip", "x smaller (gzip)", "{:.2f}"), ("smaller_loaded", "x smaller (loaded)", "{:.2f}"),
             ("accuracy_delta_points", "accuracy change (points)", "{:+.2f}")]
    page.add(table([c[1] for c in cols], [[num(r.get(k), f) for k, _, f in cols] for r in rows]))
    serve = served_variant(cfg)
    notes = [f"ensemble source: {rep.get('ensemble_source', '-')}", f"test examples: {rep.get('test_n', '-')}",
             f"threads: {rep.get('num_threads', '-')}", f"served variant: {serve}"]
    notes.append(f"model files stored: {getattr(cfg.compress, 'coding', 'none')}")
    page.add(f"<p>{esc('; '.join(notes))}. Ratios are against float32, measured in the same run; stored bytes are "
             f"what a deployment keeps and fetches, loaded bytes what the runtimes hold after decoding.</p>")
    dropped = (rep.get("zero_weight_members") or {}).get("dropped")
    if dropped:
        page.add(f"<p>Left out of every variant (zero stacker weight: they cannot change a prediction): "
                 f"{esc(', '.join(dropped))}.</p>")
    from transfuse.compress import goals_line

    for key in ("goals", "goals_pruned_int8"):
        g = rep.get(key) or {}
        if g and "faster_goal" in g:  # (a run from before the goals config lacks them: the verdict table judges)
            page.add(f"<p>Goals: {esc(goals_line(g))}.</p>")
    plt = pyplot()
    names = [str(r["variant"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    sizes = [r.get("size_bytes") for r in rows]
    mib = max((x or 0) for x in sizes) >= 10 * 2**20  # MiB for real bundles, KiB for tiny ones
    panels = ((axes[0], sizes, 2.0 ** (-20 if mib else -10), f"size ({'MiB' if mib else 'KiB'})", "{:.3g}"),
              (axes[1], [r.get("p50_ms_b1") for r in rows], 1.0, "p50 latency, batch 1 (ms)", "{:.3g}"),
              (axes[2], [r.get("accuracy") for r in rows], 1.0, "test accuracy", "{:.3f}"))
    for ax, vals, scale, label, fmt in panels:
        v = np.array([np.nan if x is None else float(x) * scale for x in vals])
        bars = ax.bar(names, v, color=["tab:green" if n == serve else "tab:blue" for n in names])
        ax.bar_label(bars, labels=["" if np.isnan(x) else fmt.format(x) for x in v], fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    page.figure(fig, "compression.png", "compression variants",
                "Every variant as a full bundle, loaded back and measured (served variant in green).")


def distillation(cfg: Any, page: Page) -> None:
    """Teacher (the stacked ensemble) vs the distilled student vs the best single CNN member, and the served
    variants' size and batch-1 latency (``distill/metrics.json``, ``compress/metrics.json``)."""
    page.add("<h2>6b. Distillation: one student CNN learns the stacked ensemble</h2>")
    if not cfg.distill.enabled:
        page.add("<p>distill: off (distill.enabled is false)</p>")
        return
    m = DISTILL.metrics(cfg)
    if m is None:
        page.add(not_run("distill"))
        return
    comp = COMPRESS.metrics(cfg) or {}
    served = {r["variant"]: r for r in comp.get("variants") or []}
    cal = m.get("calibration") or {}
    best = m["best_cnn_member"]
    rows = [["teacher: stacked ensemble", m["teacher"]["accuracy"], m["teacher"]["nll"], m["teacher"]["ece"], 1.0,
             "int8"],
            [f"student ({m.get('student_input_size', '-')} px)", m["student"]["accuracy"], m["student"]["nll"],
             m["student"]["ece"], m["fidelity"], "student_int8"],
            [f"best single CNN member ({best['name']})", best["accuracy"], best["nll"], best["ece"], None, None]]
    applied = bool(cal) and cal.get("applied", True)
    if cal:
        a = cal["test"]["after"] if applied else cal["test"]["rejected"]
        label = (f"student, temperature {cal['temperature']:.3f}" if applied else
                 f"student, temperature {cal['fitted_temperature']:.3f} (rejected by its check, not served)")
        rows.insert(2, [label, a["accuracy"], a["nll"], a["ece"], m["fidelity"], None])
    page.add(table(["model", "test accuracy", "NLL", "ECE", "agreement with the teacher", "served bytes",
                    "p50 ms (batch 1)"],
                   [[name, num(acc), num(nll), num(ece), num(fid), num((served.get(v) or {}).get("size_bytes"), "{}"),
                     num((served.get(v) or {}).get("p50_ms_b1"), "{:.3f}")] for name, acc, nll, ece, fid, v in rows]))
    gain = m.get("gain_kept")
    t, st = served.get("int8"), served.get("student_int8")
    speed = t["p50_ms_b1"] / st["p50_ms_b1"] if t and st and st.get("p50_ms_b1") else None
    notes = [f"the student keeps {num(gain, '{:.0%}')} of the ensemble's accuracy gain over {best['name']}",
             f"student_int8 is {num(speed, '{:.2f}')}x faster than the int8 ensemble at batch 1 (timed "
             "in warm blocks alternating with every variant)",
             f"{m['rows']['views']} teacher-labelled views ({m['rows']['views_per_image']} per image)"]
    if cal:
        notes.append(f"the student's {temperature_line(cal)}")
    page.add(f"<p>{esc('; '.join(notes))}.</p>")
    from transfuse.distill import STUDENT, soften
    from transfuse.finetune import read_member_split

    student_dir = storage.join(DISTILL.dir(cfg), STUDENT)
    ens_dir = ENSEMBLE.dir(cfg)
    if not all(storage.exists(storage.join(d, "predictions", "test.parquet")) for d in (student_dir, ens_dir)):
        page.add("<p>No test predictions of the student and the teacher to draw their reliability from.</p>")
        return
    _, labels, teacher = read_member_split(ens_dir, "predictions", "test")
    _, _, student = read_member_split(student_dir, "predictions", "test")
    curves = [("teacher: stacked ensemble", teacher, labels), ("student", student, labels)]
    how = ("the distilled student on the test split (distill/student/predictions/test.parquet) beside its teacher, "
           "the stacked ensemble")
    if applied:
        curves.append((f"student, T = {cal['temperature']:.3f} (served)", soften(student, cal["temperature"]),
                       labels))
        how += (f"; the student's temperature T = {cal['temperature']:.3f} was fitted on val (NLL) and is "
                "what student_int8 serves")
    reliability_figure(page, curves, "reliability_student.png", how)


def per_class(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Precision and recall per class (NaN where a class is never predicted / never present) and support."""
    cm = np.asarray(tm.confusion(probs, labels), dtype=np.float64)
    hit = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"precision": hit / cm.sum(0), "recall": hit / cm.sum(1), "n": cm.sum(1).astype(np.int64)}


def per_class_section(cfg: Any, page: Page) -> None:
    serve = served_variant(cfg)
    page.add(f"<h2>7. Precision and recall per class: float32 vs {esc(serve)}</h2>")
    from transfuse.inference import MANIFEST, load_bundle

    comp = COMPRESS.dir(cfg)
    names = list(dict.fromkeys(["float32", serve]))
    if not all(storage.exists(storage.join(comp, v, MANIFEST)) for v in names):
        page.add(not_run("compress") if not storage.exists(comp) else
                 f"<p>compress/ has no {esc(' and '.join(names))} bundle to compare</p>")
        return
    data_dir = PREPARE.dir(cfg)
    if not storage.read_manifest(data_dir):
        page.add(not_run("prepare"))
        return
    from transfuse.data import read_split_numpy

    images, labels, _ = read_split_numpy(data_dir, "test")
    stats, class_names, overall = {}, None, {}
    for v in names:
        b = load_bundle(storage.join(comp, v))
        probs = b.predict_proba(images)
        stats[v] = per_class(probs, labels)
        overall[v] = (tm.balanced_accuracy(probs, labels), tm.macro_f1(probs, labels))
        class_names = b.class_names
    rows = []
    for k, cname in enumerate(class_names or []):
        row = [esc(cname), num(int(stats["float32"]["n"][k]))]
        for metric in ("precision", "recall"):
            a, q = float(stats["float32"][metric][k]), float(stats[serve][metric][k])
            row += [num(a), num(q), num(100.0 * (q - a), "{:+.2f}")]
        rows.append(row)
    page.add(table(["class", "test n", "precision float32", f"precision {serve}", "change (points)",
                     "recall float32", f"recall {serve}", "change (points)"], rows))
    page.add(f"<p>Both bundles (compress/float32/ and compress/{esc(serve)}/) run on the prepared test split "
             f"({len(labels):,} images); '-': the class was never predicted. Balanced accuracy (mean recall over "
             f"the classes) and macro F1: "
             + "; ".join(f"{esc(v)} {num(overall[v][0])} and {num(overall[v][1])}" for v in names) + ".</p>")
