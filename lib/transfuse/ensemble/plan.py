"""The ensemble stage's plan: the scikit-learn members as built estimators, the stacker's candidates and the member
search's space, with nothing fitted."""

from __future__ import annotations

from typing import Any

from transfuse.config import Config
from transfuse.finetune import describe


def ensemble_plan(cfg: Config) -> dict[str, Any]:
    from transfuse.ensemble import learners
    from transfuse.ensemble.stacker import stacker_candidates

    e = cfg.ensemble
    learners.validate_members(e)
    return {"members": {m.name: repr(learners.build_estimator(m, seed=e.seeds[0])) for m in e.members},
            "features": {m.name: m.features for m in e.members}, "pixel_size": e.pixel_size,
            "fit_tasks": len(e.members) * (e.folds + 1) * len(e.seeds), "folds": e.folds, "seeds": e.seeds,
            "stacker_candidates": [(c.method, c.features, c.C) for c in
                                   stacker_candidates(e.stacker, e.stacker_C, e.stacker_features, e.stacker_grid_C)],
            "runner": e.parallel, "cpus_per_task": e.cpus_per_task, "member_search": member_search_plan(cfg)}


def member_search_plan(cfg: Config) -> dict[str, Any]:
    """The member search's space per kind, its trials and what they hold (transfuse.ensemble.member_search)."""
    from transfuse.ensemble import member_search

    e = cfg.ensemble
    s = e.search
    if not s.enabled:
        return {"enabled": False, "members": "ensemble.members as given (the fixed list)"}
    member_search.validate_search(e)
    views = {"embedding": f"one of the tune stage's CNN members' embeddings (tune.members={cfg.tune.members}), "
                          f"drawn per trial",
             "pixels": f"the images' pixels at {e.pixel_size or 'their prepared'} px (ensemble.pixel_size)"}
    groups = {(k, f) for k in s.kinds for f in s.features} | {(m.kind, m.features) for m in e.members}
    return {"enabled": True,
            "param_space": {k: {p: describe(d) for p, d in member_search.tune_space(e, k).items()} for k in s.kinds},
            "views": {f: views[f] for f in s.features},
            "trials": member_search.trial_count(e), "fixed_trials": [m.name for m in e.members],
            "samples_per_kind_and_view": s.num_samples, "search_alg": "BasicVariantGenerator (random, seeded)",
            "seed": e.seeds[0], "score": f"out-of-fold NLL over the stacker's {e.folds} holdout folds",
            "fits_per_trial": e.folds, "resources_per_trial": {"CPU": s.cpus_per_trial},
            "max_concurrent": s.max_concurrent, "cpus_at_full_concurrency": s.cpus_per_trial * s.max_concurrent,
            "time_budget_s": s.time_budget_s, "kept_per_kind_and_view": s.per_kind,
            "members_at_most": len(groups) * s.per_kind,
            "fit_tasks_at_most": len(groups) * s.per_kind * (e.folds + 1) * len(e.seeds)}
