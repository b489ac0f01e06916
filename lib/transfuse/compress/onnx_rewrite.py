"""Lossless rewrites of the scikit-learn members' ONNX graphs (skl2onnx output), each checked by running the old
and the new graph on the same inputs: a rewrite whose outputs differ is dropped, never shipped."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attrs(node: Any, values: dict[str, Any]) -> None:
    from onnx import helper

    del node.attribute[:]
    for k, v in values.items():
        node.attribute.append(helper.make_attribute(k, v))


def _compact_tree_classifier(node: Any) -> bool:
    """TreeEnsembleClassifier: drop leaf entries of weight 0 (the scores are sums over entries, and a class without
    entries scores 0), hit rates that are all 1 and missing-value flags that are all 0 (both the defaults)."""
    a = _attrs(node)
    if a.get("post_transform", b"NONE") not in (b"NONE", "NONE") or len(a.get("classlabels_int64s", [])) < 3:
        return False  # ORT treats binary classifiers specially: leave them as written
    keep = [i for i, w in enumerate(a["class_weights"]) if w != 0.0]
    changed = len(keep) < len(a["class_weights"])
    for k in ("class_treeids", "class_nodeids", "class_ids", "class_weights"):
        a[k] = [a[k][i] for i in keep]
    if "nodes_hitrates" in a and all(h == 1.0 for h in a["nodes_hitrates"]):
        del a["nodes_hitrates"]
        changed = True
    if "nodes_missing_value_tracks_true" in a and not any(a["nodes_missing_value_tracks_true"]):
        del a["nodes_missing_value_tracks_true"]
        changed = True
    if changed:
        _set_attrs(node, a)
    return changed


def _merge_samme(model: Any) -> bool:
    """skl2onnx's AdaBoost (SAMME) graph runs one TreeEnsembleClassifier per estimator, then ArgMax -> Equal ->
    Where(1, -1/(K-1)) -> Mul(weight) per estimator and a Sum: hundreds of nodes at batch 1. Each estimator's term
    depends only on the leaf reached, so the Sum equals one TreeEnsembleRegressor (aggregate SUM) whose leaf values
    are weight * (1 at the leaf's argmax class, -1/(K-1) elsewhere). Returns True when the pattern was replaced."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    sums = [n for n in g.node if n.op_type == "Sum" and len(n.input) >= 2]
    for total in sums:
        trees, terms = [], []
        for t in total.input:
            mul = prod.get(t)
            if mul is None or mul.op_type != "Mul":
                break
            where = prod.get(mul.input[0])
            w = inits.get(mul.input[1])
            if where is None or where.op_type != "Where" or w is None or w.size != 1:
                break
            eq, sym = prod.get(where.input[0]), inits.get(where.input[2])
            one = prod.get(where.input[1])
            if eq is None or eq.op_type != "Equal" or sym is None or sym.size != 1 or one is None or \
                    one.op_type != "ConstantOfShape" or numpy_helper.to_array(_attrs(one)["value"]).item() != 1.0:
                break
            am, cls = prod.get(eq.input[0]), inits.get(eq.input[1])
            if am is None or am.op_type != "ArgMax" or cls is None or _attrs(am).get("axis", 0) != 1 or \
                    _attrs(am).get("keepdims", 1) != 1 or _attrs(am).get("select_last_index", 0) != 0:
                break
            tree = prod.get(am.input[0])
            if tree is None or tree.op_type != "TreeEnsembleClassifier" or am.input[0] != tree.output[1]:
                break
            ta = _attrs(tree)
            k = len(ta.get("classlabels_int64s", []))
            if ta.get("post_transform", b"NONE") not in (b"NONE", "NONE") or k < 3 or \
                    not np.array_equal(np.asarray(cls).reshape(-1), np.arange(k)) or "base_values" in ta:
                break
            trees.append((tree, ta))
            terms.append((float(w.reshape(-1)[0]), float(sym.reshape(-1)[0]), k, tree.input[0]))
        else:
            if not trees or len({(t[2], t[3]) for t in terms}) != 1:
                continue
            k, x_name = terms[0][2], terms[0][3]
            nodes = {f: [] for f in ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes",
                                     "nodes_values", "nodes_truenodeids", "nodes_falsenodeids")}
            targets = {f: [] for f in ("target_treeids", "target_nodeids", "target_ids", "target_weights")}
            next_tree = 0
            for (tree, ta), (w, sym, _, _) in zip(trees, terms):
                ids = sorted(set(ta["nodes_treeids"]))
                remap = {t: next_tree + i for i, t in enumerate(ids)}
                next_tree += len(ids)
                for f in nodes:
                    vals = ta[f]
                    nodes[f] += [remap[v] for v in vals] if f == "nodes_treeids" else list(vals)
                leaf_scores: dict[tuple[int, int], np.ndarray] = {}
                for t, n_, c, cw in zip(ta["class_treeids"], ta["class_nodeids"], ta["class_ids"], ta["class_weights"]):
                    leaf_scores.setdefault((t, n_), np.zeros(k, np.float32))[c] += np.float32(cw)
                for t, n_, mode in zip(ta["nodes_treeids"], ta["nodes_nodeids"], ta["nodes_modes"]):
                    if mode not in (b"LEAF", "LEAF"):
                        continue
                    top = int(np.argmax(leaf_scores.get((t, n_), np.zeros(k, np.float32))))  # ArgMax: first max
                    for c in range(k):
                        targets["target_treeids"].append(remap[t])
                        targets["target_nodeids"].append(n_)
                        targets["target_ids"].append(c)
                        targets["target_weights"].append(w * (1.0 if c == top else sym))
            merged = helper.make_node("TreeEnsembleRegressor", [x_name], [total.output[0]], domain="ai.onnx.ml",
                                      name="samme_merged", n_targets=k, aggregate_function="SUM",
                                      post_transform="NONE", **nodes, **targets)
            idx = list(g.node).index(total)
            g.node.insert(idx, merged)
            g.node.remove(total)
            _prune_graph(model)
            return True
    return False


def _prune_graph(model: Any) -> None:
    """Remove nodes and initializers that no graph output depends on."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep_ids = {id(n) for n in keep}
    for n in [n for n in g.node if id(n) not in keep_ids]:
        g.node.remove(n)
    for i in [i for i in g.initializer if i.name not in needed]:
        g.initializer.remove(i)


def run_onnx(data: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of one ONNX graph on ``x``, by name: the graph run as a bundle runs it (``OnnxRunner``, one
    thread)."""
    from transfuse.inference import OnnxRunner

    return OnnxRunner(data, 1, "sklearn ONNX rewrite check")(x)


def optimize_sklearn_onnx(data: bytes, probe: np.ndarray, *, atol: float = 1e-5) -> tuple[bytes, dict[str, Any]]:
    """Lossless rewrites of one skl2onnx graph (AdaBoost SAMME merged into one tree ensemble; tree classifiers
    without zero leaf entries and default attributes), checked on ``probe`` (embeddings): every output equal within
    ``atol`` and the same labels, or the original bytes are returned. Returns (bytes, info)."""
    import onnx

    model = onnx.load_from_string(data)
    applied = []
    info: dict[str, Any] = {"bytes_before": len(data), "applied": applied}
    try:  # a graph of a shape these rewrites do not know is shipped as written
        if _merge_samme(model):
            applied.append("samme_merged")
        n_compact = sum(_compact_tree_classifier(n) for n in model.graph.node
                        if n.op_type == "TreeEnsembleClassifier")
    except Exception as e:  # onnx raises assorted errors on unexpected attributes
        log.warning("sklearn ONNX rewrite not applied: %s", e)
        return data, {**info, "applied": [], "dropped": f"{type(e).__name__}: {e}", "bytes_after": len(data)}
    if n_compact:
        applied.append(f"tree_compact x{n_compact}")
    if not applied:
        return data, {**info, "bytes_after": len(data)}
    new = model.SerializeToString()
    try:
        onnx.checker.check_model(model)
        old_out, new_out = run_onnx(data, probe), run_onnx(new, probe)
        worst = 0.0
        for k, v in old_out.items():
            w = new_out[k]
            if v.dtype.kind in "iu" or v.dtype == object:
                if not np.array_equal(v, w):
                    raise ValueError(f"output {k} differs on {int(np.sum(v != w))} of {len(v)} probe rows")
            else:
                worst = max(worst, float(np.max(np.abs(v.astype(np.float64) - w))))
        if worst > atol:
            raise ValueError(f"outputs differ by up to {worst:.3g} > {atol}")
    except Exception as e:  # any failure keeps the graph as the ensemble stage wrote it
        log.warning("sklearn ONNX rewrite %s dropped: %s", applied, e)
        return data, {**info, "applied": [], "dropped": str(e), "bytes_after": len(data)}
    return new, {**info, "bytes_after": len(new), "max_abs_diff": worst, "probe_rows": int(len(probe))}
