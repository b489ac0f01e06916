"""Ray Tune over the fine-tuning runs: unfreeze depth, both learning rates, head width, dropout and seed.

A trial is a function that calls ``transfuse.finetune.stage.finetune`` (the same training code as ``jobs.finetune``)
with the trial's overrides and a ``TuneReportCallback`` in the trainer's ``RunConfig``, so every epoch's
``val_accuracy`` reaches Tune's scheduler (ASHA or HyperBand), which stops weak trials early. A trial that
finishes writes a member dir under ``<run>/tune/trials/<trial_id>/``; a trial stopped early leaves none.
Trials with the same cut point share the cached frozen activations (``transfuse.finetune.cache``).

Output under ``<run>/tune/``: ``results.csv``/``results.json`` (a row per trial), ``best_config.json``,
``members.json`` (the top M trials, chosen for accuracy and diversity), ``val_accuracy_vs_depth.png``,
``summary.json`` (the best depth against the seed's fixed depth on the same test split) and the manifest.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse import storage
from transfuse.config import Config
from transfuse.data import PREPARE
from transfuse.finetune import FINETUNE, TUNE
from transfuse.finetune.loop import TrainError
from transfuse.finetune.predictions import MemberMetrics

log = logging.getLogger(__name__)

EXPERIMENT = "search"  # Tune's own experiment folder under <run>/tune/
TRIALS_DIR = "trials"  # one member dir per trial under <run>/tune/
SEARCHED = ("unfreeze", "lr_frozen", "lr_unfrozen", "head_dense", "dropout", "seed")


class SearchError(TrainError, RuntimeError):
    """The search produced no members (every trial failed or was stopped), or its members file is unreadable."""


def tune_dir(cfg: Config) -> str:
    return TUNE.dir(cfg)


def trial_dir(cfg: Config, trial_id: str) -> str:
    return storage.join(tune_dir(cfg), TRIALS_DIR, trial_id)


# ---------------------------------------------------------------------------- members.json (this module owns it)
MEMBERS_FILE = "members.json"


@dataclass(frozen=True)
class TunedMember:
    """One CNN member the search chose, as ``<run>/tune/members.json`` lists it (best first)."""

    name: str
    dir: str  # as written: absolute, a URI, or relative to the tune stage (``read_members`` resolves it)
    trial_id: str
    config: dict[str, Any]  # the searched values (SEARCHED)
    val_accuracy: Optional[float]


def write_members(cfg: Config, rows: list[dict[str, Any]]) -> list[TunedMember]:
    """``members.json`` from the chosen trials' rows, best first; named ``cnn_<rank>_u<depth>``."""
    members = [TunedMember(f"cnn_{i}_u{r['unfreeze']}", r["dir"], r["trial_id"], {k: r[k] for k in SEARCHED},
                           r["val_accuracy"]) for i, r in enumerate(rows)]
    storage.write_json(storage.join(tune_dir(cfg), MEMBERS_FILE),
                       {"members": [asdict(m) for m in members]})
    return members


def read_members(cfg: Config) -> Optional[list[TunedMember]]:
    """The members ``members.json`` lists, best first, with each dir resolved (relative dirs are relative to the
    tune stage); None when the tune stage has not written it; ``SearchError`` when it lists none or is malformed."""
    path = storage.join(tune_dir(cfg), MEMBERS_FILE)
    if not storage.exists(path):
        return None
    entries = storage.read_json(path).get("members") or []
    if not entries:
        raise SearchError(f"{path} lists no members; rerun the tune stage (python -m jobs.tune --force)")
    out = []
    for e in entries:
        try:
            d = str(e["dir"])
            if not (storage.is_uri(d) or d.startswith("/")):
                d = storage.join(tune_dir(cfg), d)
            out.append(TunedMember(str(e["name"]), d, str(e.get("trial_id", "")), dict(e.get("config") or {}),
                                   None if e.get("val_accuracy") is None else float(e["val_accuracy"])))
        except (KeyError, TypeError, ValueError) as err:
            raise SearchError(f"{path}: member entry {e!r} is malformed ({err!r}); expected name, dir, trial_id, "
                              f"config, val_accuracy") from None
    return out


def search_space(cfg: Config) -> dict[str, Any]:
    """The Tune param space from ``cfg.tune``. Random search covers every depth (a grid over depths)."""
    from ray import tune

    t = cfg.tune
    space: dict[str, Any] = {
        "lr_frozen": tune.loguniform(*t.lr_frozen),
        "lr_unfrozen": tune.loguniform(*t.lr_unfrozen),
        "head_dense": tune.choice(t.head_dense),
        "dropout": tune.choice(t.dropout),
        "seed": tune.randint(0, 2**31 - 1),
    }
    if t.search_alg == "random":
        space["unfreeze"] = tune.grid_search(list(t.unfreeze))
    else:
        space["unfreeze"] = tune.choice(list(t.unfreeze))
    return space


def samples_per_grid(cfg: Config) -> int:
    """Tune repeats a grid num_samples times: with a depth grid, spread the trial budget over the depths."""
    t = cfg.tune
    if t.search_alg == "random":
        return max(1, math.ceil(t.num_samples / len(t.unfreeze)))
    return t.num_samples


def trial_fn(config: dict[str, Any], cfg_json: dict[str, Any]) -> None:
    """One trial: fine-tune with this trial's overrides; Train's per-epoch reports reach Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from transfuse.finetune.stage import finetune

    cfg = Config.model_validate(cfg_json)
    overrides = {k: config[k] for k in SEARCHED if k in config}
    if cfg.tune.unfreeze_unit is not None:  # the searched depths may count blocks where the seed's counts layers
        overrides["unfreeze_unit"] = cfg.tune.unfreeze_unit
    out = trial_dir(cfg, tune.get_context().get_trial_id())
    # resume=True: a trial restarted after an interruption continues from its last Train checkpoint
    finetune(cfg, out, overrides, resume=True, run_config_extra={"callbacks": [TuneReportCallback()]})


def scheduler(cfg: Config) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    t = cfg.tune
    # in reported epochs; +1 so a trial that runs all its epochs is never stopped at its last report (ASHA
    # stops at max_t, which would kill the trial before it writes its member dir)
    max_t = max(1, cfg.train.epochs_frozen + cfg.train.epochs_unfrozen) + 1
    # Depth acts only once layers are unfrozen: a rung inside the frozen phase would judge every depth by the
    # same head-only training, so the first rung comes after at least one unfrozen epoch.
    grace = t.grace_period
    if cfg.train.epochs_unfrozen > 0:
        grace = max(grace, cfg.train.epochs_frozen + 1)
    if t.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(grace, max_t),
                             reduction_factor=2)
    if t.scheduler == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=max_t, reduction_factor=2)
    return FIFOScheduler()


def search_alg(cfg: Config) -> Any:
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    t = cfg.tune
    if t.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=t.max_concurrent)
    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=t.max_concurrent)


def build_tuner(cfg: Config, *, resume: bool = False) -> Any:
    from ray import tune

    fs, path = storage.resolve(tune_dir(cfg))
    trainable = tune.with_resources(tune.with_parameters(trial_fn, cfg_json=cfg.model_dump(mode="json")),
                                    {"CPU": cfg.tune.cpus_per_trial})
    exp = f"{path}/{EXPERIMENT}"
    if resume and tune.Tuner.can_restore(exp, storage_filesystem=fs):
        log.info("tune: restoring the interrupted search at %s", exp)
        return tune.Tuner.restore(exp, trainable=trainable, storage_filesystem=fs, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", scheduler=scheduler(cfg),
                                    search_alg=search_alg(cfg), num_samples=samples_per_grid(cfg),
                                    max_concurrent_trials=cfg.tune.max_concurrent),
        # a trial whose node is lost (its function runs on a worker node: the head offers no CPUs) is retried;
        # trial_fn resumes from the trial's last Train checkpoint, so no finished epoch is trained again
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=path, storage_filesystem=fs, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures)),
    )


def result_row(cfg: Config, result: Any) -> dict[str, Any]:
    trial_id = result.metrics.get("trial_id") if result.metrics else None
    if not trial_id:  # errored before its first report: the id is in the trial folder's name
        found = re.search(r"_([0-9a-f]{5}_\d{5})(_|$)", result.path.rstrip("/").rsplit("/", 1)[-1])
        trial_id = found.group(1) if found else result.path.rstrip("/").rsplit("/", 1)[-1]
    d = trial_dir(cfg, trial_id)
    manifest = storage.read_manifest(d)
    finished = bool(manifest and manifest.get("complete"))
    history = result.metrics_dataframe
    best_val = float(history["val_accuracy"].max()) if history is not None and len(history) else float("nan")
    epochs = int(history["epoch"].max()) if history is not None and len(history) else 0
    planned = cfg.train.epochs_frozen + cfg.train.epochs_unfrozen
    member = MemberMetrics.read(d) if finished else None
    return {
        "trial_id": trial_id,
        **{k: result.config.get(k) for k in SEARCHED},
        "best_val_accuracy": best_val,
        "epochs_run": epochs,
        "time_s": float(result.metrics.get("time_total_s", float("nan"))) if result.metrics else float("nan"),
        "stopped_early": (not finished) and result.error is None,
        "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}",
        "finished": finished,
        "planned_epochs": planned,
        "val_accuracy": member.val.accuracy if member else None,
        "val_nll": member.val.nll if member else None,
        "test_accuracy": member.test.accuracy if member else None,
        # beside accuracy on an imbalanced split (None: a member written before these metrics existed)
        "val_balanced_accuracy": member.val.balanced_accuracy if member else None,
        "test_balanced_accuracy": member.test.balanced_accuracy if member else None,
        "test_macro_f1": member.test.macro_f1 if member else None,
        "dir": d if finished else None,
    }


def _rank(r: dict[str, Any]) -> tuple[float, float]:
    """Val accuracy first, val NLL (what picked each trial's best epoch) breaks ties: on a few dozen val images
    accuracy moves in steps of 2 points and trials tie often (the default's first run: 0.90 and 0.90)."""
    nll = r.get("val_nll")
    return -r["val_accuracy"], nll if nll is not None and math.isfinite(nll) else math.inf


def select_members(rows: list[dict[str, Any]], m: int) -> list[dict[str, Any]]:
    """Top ``m`` finished trials by val accuracy, ties broken by val NLL; one per depth first, then the next best
    distinct configs."""
    done = sorted((r for r in rows if r["finished"]), key=_rank)
    chosen: list[dict[str, Any]] = []
    depths: set[int] = set()
    for r in done:  # diversity: the best trial of each depth
        if len(chosen) < m and r["unfreeze"] not in depths:
            chosen.append(r)
            depths.add(r["unfreeze"])
    key = lambda r: tuple(r[k] for k in SEARCHED)  # noqa: E731
    seen = {key(r) for r in chosen}
    for r in done:  # then the best of the rest, never a copy of a chosen configuration
        if len(chosen) < m and key(r) not in seen:
            chosen.append(r)
            seen.add(key(r))
    return sorted(chosen, key=_rank)


def plot_depth(rows: list[dict[str, Any]], path: str, seed_depth: int) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for stopped in (False, True):
        pts = [(r["unfreeze"], r["best_val_accuracy"]) for r in rows if r["stopped_early"] == stopped
               and not math.isnan(r["best_val_accuracy"])]
        if pts:
            ax.scatter(*zip(*pts), marker="x" if stopped else "o",
                       label="stopped early" if stopped else "finished", alpha=0.8)
    ax.axvline(seed_depth, color="grey", ls="--", lw=1, label=f"seed's depth ({seed_depth})")
    ax.set_xlabel("unfrozen backbone layers (from the top)")
    ax.set_ylabel("best val accuracy")
    ax.set_title("Depth search")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def run_search(cfg: Config, *, resume: bool = False, force: bool = False,
               baseline_dir: Optional[str] = None) -> dict[str, Any]:
    """Run (or resume) the search and write the results table, best config, members and plot."""
    import pandas as pd

    out = tune_dir(cfg)
    fp = cfg.fingerprint("data", "model", "train", "tune", "seed")
    if storage.skip_complete(out, fp, TUNE.folder, force):
        return storage.read_manifest(out)
    from transfuse.data import data_manifest

    from transfuse.class_weights import decision

    # fail once, here, rather than in every trial; every trial trains under this class-weighting decision
    weighting = decision(cfg.data, data_manifest(PREPARE.dir(cfg)))
    if force:
        storage.clear_dir(out)
    start = time.time()
    grid = build_tuner(cfg, resume=resume).fit()
    rows = [result_row(cfg, r) for r in grid]
    members = select_members(rows, cfg.tune.members)
    if not members:
        errors = [r["error"] for r in rows if r["error"]]
        raise SearchError(f"no trial of {len(rows)} finished; errors: {errors[:3]}")
    best = members[0]
    storage.write_bytes(storage.join(out, "results.csv"), pd.DataFrame(rows).to_csv(index=False).encode())
    storage.write_json(storage.join(out, "results.json"), rows)
    storage.write_json(storage.join(out, "best_config.json"), {k: best[k] for k in SEARCHED})
    write_members(cfg, members)
    plot_depth(rows, storage.join(out, "val_accuracy_vs_depth.png"), cfg.model.unfreeze)
    summary = {
        "trials": len(rows), "finished": sum(r["finished"] for r in rows),
        "stopped_early": sum(r["stopped_early"] for r in rows), "errored": sum(bool(r["error"]) for r in rows),
        "best": {k: best[k] for k in (*SEARCHED, "val_accuracy", "val_nll", "test_accuracy",
                                      "test_balanced_accuracy", "test_macro_f1")},
        "seconds": round(time.time() - start, 1),
        "class_weight": weighting,
    }
    baseline_dir = baseline_dir or FINETUNE.dir(cfg)
    base = storage.read_manifest(baseline_dir)
    if base and base.get("complete"):
        seed_test = MemberMetrics.read(baseline_dir).test.accuracy
        summary["seed_depth"] = {"unfreeze": base["config"]["model"]["unfreeze"], "test_accuracy": seed_test}
        summary["best_minus_seed_test_accuracy"] = best["test_accuracy"] - seed_test
    storage.write_json(storage.join(out, "summary.json"), summary)
    return storage.write_manifest(out, cfg, TUNE.folder, fp, summary=summary,
                                  members=[r["trial_id"] for r in members])
