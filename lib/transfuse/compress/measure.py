"""Measuring bundles: model bytes (raw and gzip), latency at batch 1 (p50, p99), throughput at batch 32, test
accuracy / NLL / ECE (with balanced accuracy, macro F1 and recall per class by class name), batch-1 latency
across variants in alternating warm blocks, a per-component breakdown, ratios against a baseline variant, the
goals check and the table. The compress stage and bench/ scripts measure
through these."""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np

from transfuse import metrics as _metrics
from transfuse import storage
from transfuse.config import GoalsConfig
from transfuse.inference import load_bundle


def model_bytes(directory: str) -> tuple[int, int, int]:
    """(stored, gzip, loaded) bytes of a bundle's model files (the manifest and the example images excluded):
    as stored (what a deployment keeps and fetches; coded files as coded), those gzipped, and as the runtimes
    load them (each file decoded as its manifest entry says, ``bundle.decode``)."""
    from pathlib import Path

    from transfuse.inference import decode, file_codings, verify

    root = Path(directory)
    codings = file_codings(verify(root)[0])
    raw = gz = loaded = 0
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != storage.MANIFEST and p.relative_to(root).parts[0] != "examples":
            b = p.read_bytes()
            raw += len(b)
            gz += len(gzip.compress(b, compresslevel=9))
            model = decode(p, codings.get(p.relative_to(root).as_posix(), "none"), p.name)
            loaded += len(model) if isinstance(model, bytes) else len(b)
    return raw, gz, loaded


def time_calls(fn: Callable[[], Any], runs: int, warmup: int = 3) -> np.ndarray:
    """Seconds per call of ``fn`` over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out


def measure_predictor(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray, *,
                      latency_runs: int = 50, throughput_runs: int = 5, batch: int = 32,
                      class_names: Optional[list[str]] = None) -> dict[str, Any]:
    """``metrics.evaluate`` on (images, labels) (per-class recall keyed by ``class_names``); latency at batch 1
    (p50, p99 ms); throughput at ``batch``."""
    probs = predict(images)
    row = {k: v for k, v in _metrics.evaluate(probs, labels, class_names).items()}
    one = images[:1]
    lat = time_calls(lambda: predict(one), latency_runs)
    xb = images[:batch] if len(images) >= batch else np.concatenate([images] * (batch // len(images) + 1))[:batch]
    thr = time_calls(lambda: predict(xb), throughput_runs)
    row.update({**_latency_ms(lat), f"throughput_b{batch}": float(batch / np.median(thr))})
    return row


def _latency_ms(seconds: np.ndarray) -> dict[str, float]:
    """p50 and p99 of batch-1 call times, in milliseconds."""
    return {"p50_ms_b1": float(np.percentile(seconds, 50) * 1e3), "p99_ms_b1": float(np.percentile(seconds, 99) * 1e3)}


def variant_row(directory: str, images: np.ndarray, labels: np.ndarray, *, num_threads: int = 1,
                latency_runs: int = 50, throughput_runs: int = 5) -> dict[str, Any]:
    """Load a written variant bundle (verified) and measure it."""
    b = load_bundle(directory, num_threads=num_threads)
    raw, gz, loaded = model_bytes(directory)
    row = {"variant": b.manifest["variant"], "size_bytes": raw, "size_gzip_bytes": gz, "size_loaded_bytes": loaded}
    row.update(measure_predictor(b.predict_proba, images, labels, latency_runs=latency_runs,
                                 throughput_runs=throughput_runs, class_names=list(b.class_names)))
    return row


def blocked_latency(directories: dict[str, str], images: np.ndarray, *, num_threads: int = 1, runs: int = 100,
                    blocks: int = 6, warmup: int = 10) -> dict[str, dict[str, float]]:
    """Batch-1 latency of several bundles as a replica serving one of them sees it: each timed in warm blocks of
    ``runs`` calls, the blocks alternating between bundles (A B, B A, ...) so that load from other processes
    falls on every bundle alike. Switching bundle every call instead makes each call also pay for the caches the
    other bundles evicted, which penalises a small model most (and more so with a large bundle in the rotation).
    Returns {name: {p50_ms_b1, p99_ms_b1}}."""
    bundles = {k: load_bundle(d, num_threads=num_threads) for k, d in directories.items()}
    one = np.asarray(images[:1])
    t: dict[str, list[np.ndarray]] = {k: [] for k in bundles}
    order = list(bundles)
    for i in range(blocks):
        for k in (order if i % 2 == 0 else order[::-1]):
            t[k].append(time_calls(lambda: bundles[k].predict_proba(one), runs, warmup))
    return {k: _latency_ms(np.concatenate(v)) for k, v in t.items()}


def component_breakdown(directory: str, images: np.ndarray, *, num_threads: int = 1,
                        runs: int = 200) -> list[dict[str, Any]]:
    """Where a bundle's batch-1 latency and bytes go: validation + preprocessing, the trunk, each CNN top (members
    exported as one graph: the first pays for it), each sklearn member and the combiner, timed IN PIPELINE ORDER
    on the first image (p50 ms of each part over ``runs`` passes, through ``Bundle.batch_probs``), then the whole
    ``predict_proba`` in the same passes and what is left of it (Python glue). Timing a part alone in a tight loop
    reads far lower (its weights and code stay in cache); in order they pay the cold caches that a real request
    pays."""
    from pathlib import Path

    b = load_bundle(directory, num_threads=num_threads)
    m, root = b.manifest, Path(b.path)
    one = np.asarray(images[:1])
    files: dict[str, Optional[str]] = {"preprocess": None}
    if m.get("trunk"):
        files["trunk"] = m["trunk"]["file"]
    files.update({f"cnn {meta['name']}": meta["file"] for meta in m["cnn_members"]})
    files.update({f"sklearn {meta['name']}": meta["file"] for meta in m["sklearn_members"]})
    combiner = f"combiner ({m['combiner']['kind']})"
    files[combiner] = m["combiner"].get("file")
    t: dict[str, list[float]] = {k: [] for k in [*files, "predict_proba (total)"]}

    def one_pass() -> None:
        last = [time.perf_counter()]

        def tick(part: str) -> None:
            now = time.perf_counter()
            t[part].append(now - last[0])
            last[0] = now

        b.combine(b.batch_probs(b.validate(one), tick))
        tick(combiner)
        t0 = time.perf_counter()
        b.predict_proba(one)
        t["predict_proba (total)"].append(time.perf_counter() - t0)

    for _ in range(3):
        one_pass()
    for v in t.values():
        v.clear()
    for _ in range(runs):
        one_pass()
    seen: set[str] = set()  # a graph several CNN members share counts once (with the first of them)
    rows = []
    for k, f in files.items():
        rows.append({"component": k, "file": f, "bytes": (root / f).stat().st_size if f and f not in seen else 0,
                     "p50_ms_b1": float(np.median(t[k]) * 1e3)})
        seen.add(f)
    parts = sum(r["p50_ms_b1"] for r in rows)
    total = float(np.median(t["predict_proba (total)"]) * 1e3)
    rows.append({"component": "predict_proba (total)", "file": None, "bytes": sum(r["bytes"] for r in rows),
                 "p50_ms_b1": total})
    rows.append({"component": "glue (total - parts)", "file": None, "bytes": 0, "p50_ms_b1": total - parts})
    return rows


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    total = next(r for r in rows if r["component"].startswith("predict_proba"))
    lines = [f"{'component':<28}{'bytes':>10}{'%bytes':>8}{'p50 ms':>9}{'%time':>7}"]
    for r in rows:
        lines.append(f"{r['component'][:28]:<28}{r['bytes']:>10}{100 * r['bytes'] / max(total['bytes'], 1):>7.1f}%"
                     f"{r['p50_ms_b1']:>9.3f}{100 * r['p50_ms_b1'] / total['p50_ms_b1']:>6.1f}%")
    return "\n".join(lines)


def with_ratios(rows: list[dict], base: str = "float32") -> list[dict]:
    """Add speed-up, size ratio and accuracy change against the ``base`` row (all measured in this run)."""
    ref = next((r for r in rows if r["variant"] == base), None)
    if ref is None:
        return rows
    for r in rows:
        r["speedup_b1"] = ref["p50_ms_b1"] / r["p50_ms_b1"]
        r["smaller_raw"] = ref["size_bytes"] / r["size_bytes"] if r.get("size_bytes") else float("nan")
        r["smaller_gzip"] = ref["size_gzip_bytes"] / r["size_gzip_bytes"] if r.get("size_gzip_bytes") else float("nan")
        if r.get("size_loaded_bytes") and ref.get("size_loaded_bytes"):
            r["smaller_loaded"] = ref["size_loaded_bytes"] / r["size_loaded_bytes"]
        r["accuracy_delta_points"] = 100.0 * (r["accuracy"] - ref["accuracy"])
    return rows


def goals(rows: list[dict], g: GoalsConfig, variant: str = "int8", base: str = "float32") -> dict[str, Any]:
    """``variant`` against ``base`` judged by the config's goals (``goals.served_faster``, ``served_smaller``,
    ``served_accuracy_points``): each ratio as measured, its goal, and whether it was met."""
    r = next((x for x in rows if x["variant"] == variant), None)
    if r is None or "speedup_b1" not in r:
        return {}
    delta = r["accuracy_delta_points"]
    return {"variant": variant, "against": base,
            "speedup_b1": r["speedup_b1"], "faster_goal": g.served_faster, "faster": r["speedup_b1"] >= g.served_faster,
            "smaller_raw": r["smaller_raw"], "smaller_goal": g.served_smaller,
            "smaller_loaded": r.get("smaller_loaded"),
            "smaller": r["smaller_raw"] >= g.served_smaller,
            "accuracy_delta_points": delta, "accuracy_goal_points": g.served_accuracy_points,
            "accuracy_kept": round(delta, 6) >= g.served_accuracy_points}  # rounded: points, not float noise


def goals_line(g: Mapping[str, Any]) -> str:
    """One sentence for a ``goals`` record (the report, jobs/compress.py and bench/compress.py print it)."""
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    loaded = f"; {g['smaller_loaded']:.2f}x as loaded" if g.get("smaller_loaded") else ""
    return (f"{g['variant']} vs {g['against']}: {g['speedup_b1']:.2f}x faster at batch 1 (goal {g['faster_goal']:g}x: "
            f"{met(g['faster'])}), {g['smaller_raw']:.2f}x smaller stored (goal {g['smaller_goal']:g}x: "
            f"{met(g['smaller'])}{loaded}), "
            f"accuracy {g['accuracy_delta_points']:+.2f} points (goal >= {g['accuracy_goal_points']:+g}: "
            f"{met(g['accuracy_kept'])})")


def format_table(rows: list[dict]) -> str:
    cols = [("variant", "{:<14}"), ("size_bytes", "{:>10}"), ("size_gzip_bytes", "{:>10}"), ("p50_ms_b1", "{:>8.2f}"),
            ("p99_ms_b1", "{:>8.2f}"), ("throughput_b32", "{:>9.1f}"), ("accuracy", "{:>7.4f}"), ("nll", "{:>7.4f}"),
            ("ece", "{:>7.4f}"), ("speedup_b1", "{:>6.2f}"), ("smaller_raw", "{:>6.2f}"), ("smaller_gzip", "{:>6.2f}"),
            ("smaller_loaded", "{:>6.2f}"), ("accuracy_delta_points", "{:>7.2f}")]
    head = ["variant", "bytes", "gzip", "p50ms", "p99ms", "img/s@32", "acc", "nll", "ece", "xfast", "xsmall", "xsm_gz",
            "xsm_ld", "dacc_pt"]
    widths = [len(f.format(0 if k != "variant" else "")) for k, f in cols]
    lines = [" ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for r in rows:
        cells = []
        for k, f in cols:
            v = r.get(k)
            cells.append(f.format(v) if v is not None else "-".rjust(len(f.format(0 if k != "variant" else ""))))
        lines.append(" ".join(cells))
    return "\n".join(lines)


@dataclass(frozen=True)
class CompressMetrics:
    """The compress stage's ``metrics.json``, typed where other stages read it: one row per variant (the columns
    ``variant_row`` and ``with_ratios`` write), the variant it serves, the members it left out; ``raw`` keeps the
    whole file (the report's tables)."""

    variants: list[dict[str, Any]]
    served: Optional[str]
    dropped: list[str]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CompressMetrics":
        return cls(variants=list(d.get("variants") or []), served=d.get("served"),
                   dropped=list((d.get("zero_weight_members") or {}).get("dropped") or []), raw=d)

    def variant(self, name: str) -> Optional[dict[str, Any]]:
        return next((r for r in self.variants if r.get("variant") == name), None)


def served_variant(cfg: Any) -> str:
    """The variant a run serves: the compress stage's record of it (its choice under ``serve_variant: auto``),
    else the config's."""
    from transfuse.compress import COMPRESS

    m = COMPRESS.read(cfg)
    return (m.served if m is not None else None) or cfg.compress.serve_variant
