"""The compress stage: prune and quantize the ensemble's CNN members, write every variant as a bundle, measure it.

- The ensemble to compress is ``transfuse.ensemble.fitted``'s reading of ``ensemble/`` (zero-weight members left
  out, see below); with ``distill.enabled`` the distilled student is one more variant (``student_int8``).
- Pruning (``transfuse.compress.prune``) and the TFLite export with one shared trunk (``transfuse.compress.tflite``);
  the scikit-learn members' ONNX graphs are rewritten losslessly (``transfuse.compress.onnx_rewrite``).
- Dead members: a member whose stacker columns are all exactly zero (the log-linear pool gives w_m = 0 to
  members that do not help) cannot change a prediction, so no variant carries it (``drop_zero_weight_members``):
  lossless, and it shrinks float32 and int8 alike.
- Variant table: each variant is written as a full bundle, loaded back with ``load_bundle`` and measured
  (``transfuse.compress.measure``): model bytes stored (``compress.coding``), gzipped and as loaded, latency at batch 1
  (p50, p99), throughput at batch 32, test accuracy / NLL / ECE, balanced accuracy, macro F1 and recall per class
  (by class name).
- Class weights: ``metrics.json`` records the run's decision (``class_weights.decision``) that the members and the
  stacker were fitted under. The pruning fine-tune here is not weighted: it follows the float member's outputs
  (``compress.prune_distill``), which already carry the weighting, or the labels the member was trained on.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from transfuse.compress import BUNDLE, COMPRESS, measure
from transfuse.compress.onnx_rewrite import optimize_sklearn_onnx
from transfuse.compress.prune import prune_member
from transfuse.compress.tflite import QUANT_MODES, CompressError, Exported, export_members, representative_raw
from transfuse.config import (AUTO_VARIANT, STUDENT_VARIANT, CompressConfig, Config, digest, expand_variants,
                              pruned_name)
from transfuse.data import PREPARE
from transfuse.ensemble import EnsembleParts, EnsembleSource, ensemble_to_compress
from transfuse.finetune import KerasMember
from transfuse.inference import BundleCnn, PreprocessSpec, example_images, preprocess, write_bundle

log = logging.getLogger(__name__)

VARIANTS = ("float32", "pruned", "int8", "pruned_int8", "float16", "dynamic_int8")  # kinds (config.variants)


def optimize_parts(parts: EnsembleParts, members: list[KerasMember], raw: np.ndarray) -> tuple[EnsembleParts, dict]:
    """``optimize_sklearn_onnx`` on every sklearn member, checked on what it reads for ``raw`` (train images as
    prepared): its CNN member's embeddings or the pixel features, plus those with each column shuffled. The same
    members, equal outputs: used by every variant alike."""
    import dataclasses

    from transfuse import finetune

    x = preprocess(raw, PreprocessSpec(**members[0].spec["preprocess"]))
    emb: dict[str, np.ndarray] = {}
    out, info = [], {}
    for sk in parts.sklearn:
        if sk.features == "embedding" and sk.embedding_of not in emb:
            m = next((m for m in members if m.name == sk.embedding_of), None)
            if m is None:
                raise CompressError(f"sklearn member {sk.name} reads {sk.embedding_of!r}, not a CNN member "
                                    f"{[m.name for m in members]}")
            emb[sk.embedding_of] = finetune.embedding_model(m.model).predict(x, batch_size=256, verbose=0)
        v = sk.inputs(raw, emb)
        # plus the same values with every column shuffled on its own: feature combinations the real rows lack
        rng = np.random.default_rng(0)
        mixed = np.stack([rng.permutation(c) for c in v.T], axis=1) if len(v) > 1 else v
        data, info[sk.name] = optimize_sklearn_onnx(sk.data, np.concatenate([v, mixed]).astype(np.float32))
        out.append(dataclasses.replace(sk, data=data))
        log.info("sklearn member %s: %s", sk.name, info[sk.name])
    return EnsembleParts(out, parts.stacker), info


def write_variant(directory: str, exported: Exported, members: list[KerasMember], parts: EnsembleParts, *,
                  name: str, version: str, class_names: list[str], input_shape: tuple[int, int, int],
                  num_threads: int = 1, metrics: Optional[dict] = None, extra: Optional[dict] = None,
                  examples: Optional[list[tuple[str, bytes]]] = None, overwrite: bool = True,
                  coding: str = "none", image_policy: Optional[dict] = None) -> dict:
    spec = members[0].spec
    if exported.merged is not None:
        cnn = [BundleCnn(name=m.name, data=exported.merged, format="tflite", input="image",
                         logits_output=f"m{i}_logits", embedding_output=f"m{i}_embedding")
               for i, m in enumerate(members)]
    else:
        cnn = [BundleCnn(name=m.name, data=exported.tops[m.name], format="tflite",
                         input="trunk" if exported.trunk is not None else "image") for m in members]
    return write_bundle(
        directory, name=name, version=version, class_names=class_names, input_shape=input_shape,
        preprocess_spec=PreprocessSpec(**spec["preprocess"]), cnn_members=cnn, trunk=exported.trunk,
        sklearn_members=parts.sklearn, stacker=parts.stacker, variant=exported.mode, metrics=metrics,
        num_threads=num_threads, examples=examples, overwrite=overwrite, coding=coding, image_policy=image_policy,
        extra={"shared_trunk": {"cut_layer": exported.cut_layer}, **(extra or {})})


# the served bundle's test metrics (its manifest): what every stage reports, by class too
SERVED_METRICS = ("accuracy", "nll", "ece", "n", "balanced_accuracy", "macro_f1", "per_class_recall")


def parse_variant(name: str, sparsity: list[float]) -> tuple[Optional[float], str]:
    """(sparsity or None, quantization mode) of a variant name; CompressError listing the allowed names."""
    from transfuse.config import pruned_name

    if name in QUANT_MODES:
        return None, name
    for s in sparsity:
        base = pruned_name(s)
        if name == base:
            return s, "float32"
        if name == base + "_int8":
            return s, "int8"
    allowed = list(QUANT_MODES) + expand_variants(["pruned", "pruned_int8"], sparsity)
    raise CompressError(f"variant {name!r} is not one of {allowed} (kinds {VARIANTS}; pruned variants are named by "
                        f"compress.sparsity {sparsity})")


def build_variants(members: list[KerasMember], variants: list[str], *, rep: np.ndarray, x_train: np.ndarray,
                   y_train: np.ndarray, ccfg: CompressConfig) -> tuple[dict[str, Exported], dict[str, Any]]:
    """Exported files per variant (kinds expanded over ``ccfg.sparsity``); the pruned members of each sparsity
    are built once and shared by its float32 and int8 variants. Returns (exported by name, pruning report by
    pruned name -> member -> {target, scope, layers})."""
    names = expand_variants(list(variants), list(ccfg.sparsity))
    plan = [(v, *parse_variant(v, list(ccfg.sparsity))) for v in names]
    exported: dict[str, Exported] = {}
    pruning: dict[str, Any] = {}
    pruned: dict[float, list[KerasMember]] = {}
    scope, distill = ccfg.prune_scope, ccfg.prune_distill
    for v, target, mode in plan:
        if target is None:
            exported[v] = export_members(members, mode, rep, share_trunk=ccfg.share_trunk, merge=ccfg.merge_members)
            continue
        if target not in pruned:
            pruned[target], report = [], {}
            for m in members:
                pm, sp = prune_member(m, x_train, y_train, sparsity=target, epochs=ccfg.prune_epochs,
                                      batch_size=ccfg.prune_batch_size, lr=ccfg.prune_lr,
                                      schedule=ccfg.prune_schedule, frequency=ccfg.prune_frequency,
                                      tolerance=ccfg.sparsity_tolerance, scope=scope, distill=distill,
                                      ramp=ccfg.prune_ramp)
                pruned[target].append(pm)
                # top-1 agreement with the float member on the train images: how much the member itself moved
                agree = float(np.mean(pm.model.predict(x_train, batch_size=256, verbose=0).argmax(1)
                                      == m.model.predict(x_train, batch_size=256, verbose=0).argmax(1)))
                report[m.name] = {"target": target, "scope": scope, "distill": distill, "layers": sp,
                                  "train_agreement_with_float": agree}
            pruning[pruned_name(target)] = report
        exported[v] = export_members(pruned[target], mode, rep, share_trunk=ccfg.share_trunk,
                                     merge=ccfg.merge_members)
        exported[v].mode = v
    return exported, pruning


def _fingerprint(cfg: Config, src: EnsembleSource) -> str:
    """The ensemble's fingerprint, and the distilled student's manifest when distilling."""
    from transfuse import storage

    if not cfg.distill.enabled:
        return src.fingerprint
    from transfuse.distill import DISTILL

    man = DISTILL.path(cfg, storage.MANIFEST)
    if not storage.exists(man):
        raise CompressError(f"distill.enabled, but the distill stage has not run: no {man}")
    return digest({"ensemble": src.fingerprint, "distill": storage.sha256(man)})


def student_variant(cfg: Config, rep_raw: np.ndarray, num_classes: int) -> tuple[Exported, list[KerasMember],
                                                                                  EnsembleParts, str]:
    """The distilled student as an int8 bundle's contents: the one CNN member (no scikit-learn member), and its
    fitted temperature as a one-member stacker (none when the distill stage fitted none)."""
    from transfuse import storage
    from transfuse.distill import DISTILL, STUDENT, read_temperature, temperature_stacker
    from transfuse import finetune

    d = DISTILL.dir(cfg)
    model, spec = finetune.load_member(storage.join(d, STUDENT))
    student = KerasMember(STUDENT, model, spec)
    rep = preprocess(rep_raw, PreprocessSpec(**spec["preprocess"]))
    ex = export_members([student], "int8", rep, share_trunk=False)
    ex.mode = STUDENT_VARIANT
    temp = read_temperature(d)
    stacker = temperature_stacker(temp, num_classes) if temp else None
    return ex, [student], EnsembleParts([], stacker), "distill"


def run_compress(cfg: Config, *, force: bool = False) -> dict:
    """The compress stage: every variant as a bundle under ``<run>/compress/<variant>/`` with the measured table in
    ``compress/metrics.json``, and the ``compress.serve_variant`` bundle in ``<run>/bundle/``. Returns the compress
    manifest."""
    from transfuse import storage
    from transfuse.data import data_manifest, read_split_numpy

    ccfg = cfg.compress
    names = expand_variants(list(ccfg.variants), list(ccfg.sparsity)) + [STUDENT_VARIANT] * cfg.distill.enabled
    if ccfg.serve_variant not in names and ccfg.serve_variant != AUTO_VARIANT:
        raise CompressError(f"compress.serve_variant = {ccfg.serve_variant!r} must be an exported variant: {names}")
    src, dropped = ensemble_to_compress(cfg)
    out, bundle_dir = COMPRESS.dir(cfg), BUNDLE.dir(cfg)
    fp = _fingerprint(cfg, src)
    if storage.exists(storage.join(bundle_dir, storage.MANIFEST)) and storage.skip_complete(out, fp, COMPRESS.folder,
                                                                                       force):
        return storage.read_manifest(out)
    members, pspec = _load_members(src)
    data_dir = PREPARE.dir(cfg)
    dm = data_manifest(data_dir)
    class_names = list(dm["class_names"])
    x_tr, y_tr, _ = read_split_numpy(data_dir, "train")
    x_te, y_te, _ = read_split_numpy(data_dir, "test")
    rep_raw = representative_raw(x_tr, ccfg.representative_examples, seed=cfg.seed)
    rep = preprocess(rep_raw, pspec)
    sk_info: dict = {}
    if ccfg.optimize_sklearn and src.parts.sklearn:
        parts, sk_info = optimize_parts(src.parts, members, rep_raw)
        src = EnsembleSource(src.members, parts, src.source, src.fingerprint)
    exported, pruning = build_variants(members, list(ccfg.variants), rep=rep, x_train=preprocess(x_tr, pspec),
                                       y_train=y_tr, ccfg=ccfg)
    # what each variant's bundle holds: (exported files, CNN members, scikit-learn members + combiner, source)
    contents = {v: (ex, members, src.parts, src.source) for v, ex in exported.items()}
    if cfg.distill.enabled:
        contents[STUDENT_VARIANT] = student_variant(cfg, rep_raw, len(class_names))
    storage.makedirs(out)
    storage.clear_dir(out)  # no stale variants from an earlier run
    common = dict(name=cfg.serve.name, version=src.fingerprint, class_names=class_names,
                  input_shape=tuple(int(d) for d in x_tr.shape[1:]), num_threads=ccfg.num_threads,
                  examples=example_images(x_te, y_te, class_names), coding=ccfg.coding,
                  image_policy=dm.get("image_policy"))
    rows = measure_variants(out, contents, common, x_te, y_te, ccfg)
    report = {**variants_report(cfg, rows, exported, dm), "pruning": pruning, "sklearn_rewrites": sk_info,
              "ensemble_source": src.source, "zero_weight_members": dropped, "test_n": int(len(y_te))}
    served, report["serve_choice"] = ccfg.serve_variant, None
    if served == AUTO_VARIANT:
        x_va = read_split_numpy(data_dir, "val")[0]
        served, report["serve_choice"] = choose_served(
            {r["variant"]: storage.join(out, r["variant"]) for r in rows}, rows, np.concatenate([x_tr, x_va]),
            cfg.goals.served_accuracy_points, ccfg.num_threads)
    report["served"] = served
    storage.write_json(COMPRESS.metrics_path(cfg), report)
    serve_row = next(r for r in rows if r["variant"] == served)
    ex, v_members, v_parts, v_source = contents[served]
    write_variant(bundle_dir, ex, v_members, v_parts, **common, overwrite=True,
                  metrics={"test": {k: serve_row[k] for k in SERVED_METRICS if k in serve_row}, "variants": rows,
                           "goals": report["goals"]},
                  extra={"ensemble_source": v_source, "stage": BUNDLE.folder, "complete": True,
                         "fingerprint": fp, "config": cfg.model_dump(mode="json")})
    return storage.write_manifest(out, cfg, COMPRESS.folder, fp, variants=[r["variant"] for r in rows],
                                  serve_variant=served, bundle=bundle_dir, metrics=report["goals"])


def _load_members(src: EnsembleSource) -> tuple[list[KerasMember], PreprocessSpec]:
    """The ensemble's CNN members (tf_keras) and the one preprocessing they share (``CompressError`` when they do
    not: one bundle runs one preprocessing function)."""
    from transfuse import finetune

    members = []
    for name, d in src.members:
        model, spec = finetune.load_member(d)
        members.append(KerasMember(name, model, spec))
    pspec = PreprocessSpec(**members[0].spec["preprocess"])
    if any(PreprocessSpec(**m.spec["preprocess"]) != pspec for m in members):
        raise CompressError("CNN members use different preprocessing; one bundle runs one preprocessing function")
    return members, pspec


def measure_variants(out: str, contents: dict[str, tuple], common: dict[str, Any], x_te: np.ndarray,
                     y_te: np.ndarray, ccfg: CompressConfig) -> list[dict]:
    """Each variant of ``contents`` written as a bundle under ``out/<variant>``, loaded back and measured on the
    test split (``measure.variant_row``); with several variants, batch-1 latency measured again in warm blocks
    alternating between them (ratios robust to load). The table's rows, with ratios to float32."""
    from transfuse import storage
    from transfuse.inference import fetch

    rows = []
    for v, (ex, v_members, v_parts, v_source) in contents.items():
        vdir = storage.join(out, v)
        write_variant(vdir, ex, v_members, v_parts, **common, extra={"ensemble_source": v_source})
        local = vdir if not storage.is_uri(vdir) else str(fetch(vdir))
        row = measure.variant_row(local, x_te, y_te, num_threads=ccfg.num_threads, latency_runs=ccfg.latency_runs,
                                  throughput_runs=ccfg.throughput_runs)
        row["variant"] = v
        rows.append(row)
        log.info("variant %s: %s", v, {k: round(val, 4) if isinstance(val, float) else val for k, val in row.items()})
    if len(rows) > 1:
        dirs = {v: (storage.join(out, v) if not storage.is_uri(out) else str(fetch(storage.join(out, v))))
                for v in contents}
        lat = measure.blocked_latency(dirs, x_te, num_threads=ccfg.num_threads, runs=ccfg.latency_runs)
        for r in rows:
            r.update(lat[r["variant"]], latency="blocked")
    return measure.with_ratios(rows)


def variants_report(cfg: Config, rows: list[dict], exported: dict[str, Exported], dm: dict) -> dict[str, Any]:
    """The parts of ``compress/metrics.json`` read off the variant table: the rows, the goals of int8, of the
    pruned int8 variants and of every variant against float32, the shared trunk's cut per variant, the threads
    measured with and the run's class-weight decision."""
    from transfuse.class_weights import decision

    pruned_int8 = [v for v in exported if v.startswith("pruned") and v.endswith("_int8")]
    return {"variants": rows, "goals": measure.goals(rows, cfg.goals, "int8") if "int8" in exported else {},
            # the first pruned int8 variant (the report reads this key); every one in goals_by_variant
            "goals_pruned_int8": measure.goals(rows, cfg.goals, pruned_int8[0]) if pruned_int8 else {},
            "goals_by_variant": {v: measure.goals(rows, cfg.goals, v) for v in exported
                                 if v != "float32" and "float32" in exported},
            "num_threads": cfg.compress.num_threads, "shared_trunk": {v: ex.cut_layer for v, ex in exported.items()},
            "class_weight": decision(cfg.data, dm)}


def choose_served(dirs: dict[str, str], rows: list[dict], images: np.ndarray, points: float,
                  num_threads: int = 1) -> tuple[str, dict]:
    """``serve_variant: auto``: the variant with the lowest batch-1 latency among those whose top-1 answers agree
    with float32's on at least ``1 + points / 100`` of ``images`` (the labelled train and val images; points:
    goals.served_accuracy_points, <= 0), else float32. Agreement bounds the accuracy lost on those images (a variant
    can be no more wrong than it disagrees) and needs no label, so it rests on every labelled image rather than on
    the val split alone; the test split only reports what the choice gave."""
    from transfuse import storage
    from transfuse.inference import fetch, load_bundle

    answers = {}
    for v, d in dirs.items():
        b = load_bundle(d if not storage.is_uri(d) else str(fetch(d)), num_threads=num_threads)
        answers[v] = b.predict_proba(images).argmax(1)
    agreement = {v: float(np.mean(a == answers["float32"])) for v, a in answers.items()}
    latency = {r["variant"]: r.get("p50_ms_b1", float("inf")) for r in rows}
    ok = [v for v in agreement if v != STUDENT_VARIANT and agreement[v] >= 1 + points / 100 - 1e-12]
    served = min(ok, key=lambda v: latency[v]) if ok else "float32"
    return served, {"rule": f"fastest variant agreeing with float32 on >= {100 + points:g}% of the labelled train "
                            "and val images", "n": int(len(images)), "agreement": agreement, "p50_ms_b1": latency,
                    "served": served}
