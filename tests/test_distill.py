"""The distill stage on digits with a label budget and an unlabelled pool: the prepared pool has no label column
and the stage refuses one that has; the teacher labels every augmented view itself; the student is a member like
any other; compress writes it as the ``student_int8`` bundle serving its fitted temperature; the report shows
teacher, student and best member in one table. Plus the pieces: views, the loss, the temperature stacker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import smoke_config
from transfuse import storage
from transfuse.config import ConfigError, load_config
from transfuse.distill.stage import read_temperature, temperature_stacker
from transfuse.distill.student import kd_loss
from transfuse.distill.teacher import DistillError, augment_view, read_pool, soften
from transfuse.inference.combine import combine_probs
from transfuse.report import REPORT_DIR

BUDGET = ["data.labelled_per_class=40", "data.test_per_class=30", "data.unlabelled_per_class=40",
          "distill.enabled=true", "distill.epochs=4", "distill.views=2", "distill.batch_size=32",
          "distill.lr=3.0e-3", "distill.unfreeze_layers=18", "compress.variants=[float32, int8]",
          "distill.temperature_check=false"]  # serve the fitted temperature (a rejected one: the test at the end)
# (the smoke CNN members learn from random weights on 160 labels and stay near chance; the teacher's accuracy
# comes from its pixel members: so the student here trains every layer, as from scratch, at a higher rate)


@pytest.fixture(scope="module")
def distilled(ray_cluster, tmp_path_factory):
    from transfuse.pipeline import run_pipeline

    cfg = smoke_config(tmp_path_factory.mktemp("distill"), "distill", BUDGET)
    run_pipeline(cfg, until="compress")
    return cfg


def _dir(cfg, stage: str) -> Path:
    return Path(storage.join(storage.run_dir(cfg), stage))


def test_the_unlabelled_pool_is_written_without_labels_and_apart_from_every_labelled_split(distilled):
    data = _dir(distilled, "data")
    table = pq.read_table(data / "unlabelled")
    assert set(table.column_names) == {"image", "id"}  # no label column at all
    manifest = storage.read_manifest(str(data))
    assert manifest["unlabelled"]["rows"] == table.num_rows == 10 * 40
    assert "unlabelled" not in manifest["counts"]  # per-class counts would be labels
    pool = set(table.column("id").to_pylist())
    for split in ("train", "val", "holdout", "test"):
        ids = set(pq.read_table(data / split).column("id").to_pylist())
        assert ids and not ids & pool, split


def test_the_stage_refuses_a_pool_with_a_label_column_and_a_run_without_a_pool(tmp_path, ray_cluster):
    bad = tmp_path / "data" / "unlabelled"
    bad.mkdir(parents=True)
    pq.write_table(pa.table({"image": [b"x"], "id": ["a"], "label": [3]}), bad / "part.parquet")
    with pytest.raises(DistillError, match=r"has a label column .*must never read their labels"):
        read_pool(str(tmp_path / "data"))
    with pytest.raises(DistillError, match=r"no unlabelled split .*data.unlabelled_per_class"):
        read_pool(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match=r"distill.enabled needs an unlabelled pool"):
        load_config(None, ["distill.enabled=true"])
    with pytest.raises(ConfigError, match=r"serve_variant 'student_int8' needs distill.enabled"):
        load_config(None, ["compress.serve_variant=student_int8"])


def test_student_learns_the_teacher_and_reports_it_beside_the_best_member(distilled):
    m = json.loads((_dir(distilled, "distill") / "metrics.json").read_text())
    ens = json.loads((_dir(distilled, "ensemble") / "metrics.json").read_text())
    # the teacher is the stacked ensemble: its test accuracy is the ensemble stage's first seed's
    assert m["teacher"]["accuracy"] == pytest.approx(ens["test"]["0"]["stack"]["accuracy"])
    assert m["best_cnn_member"]["name"] in ens["summary"]
    assert m["rows"] == {"views": 2 * (400 + 160), "per_view": 400 + 160, "views_per_image": 2}
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4]
    # the stage's typed reader (what jobs.distill prints and the compress stage reads)
    from transfuse.distill import DISTILL

    typed = DISTILL.read(distilled)
    assert (typed.student.accuracy, typed.fidelity, typed.best_member) == (
        m["student"]["accuracy"], m["fidelity"], m["best_cnn_member"]["name"])
    # agreement with the teacher, recomputed from the saved predictions
    from transfuse.finetune.predictions import read_member_split

    ids, y, student = read_member_split(str(_dir(distilled, "distill") / "student"), "predictions", "test")
    t_ids, _, teacher = read_member_split(str(_dir(distilled, "ensemble")), "predictions", "test")
    assert list(ids) == list(t_ids)
    assert m["fidelity"] == pytest.approx(float(np.mean(student.argmax(1) == teacher.argmax(1))))
    assert m["student"]["accuracy"] == pytest.approx(float(np.mean(student.argmax(1) == y)))
    assert m["fidelity"] > 0.5 and m["student"]["accuracy"] > 0.5  # 10 classes: chance is 0.1
    cal = m["calibration"]
    assert cal["temperature"] > 0 and cal["test"]["after"]["accuracy"] == cal["test"]["before"]["accuracy"]
    # the console's progress reading: the newest checkpoint's history holds every epoch
    from transfuse.finetune.progress import newest_checkpoint_file
    from transfuse.distill import HISTORY_FILE
    from transfuse.finetune.stage import TRAIN_DIR

    path = newest_checkpoint_file(str(_dir(distilled, "distill") / TRAIN_DIR), HISTORY_FILE, 0.0)
    assert path is not None and len(json.loads(Path(path).read_text())) == 4
    # the stage's own reader, as the console starts it (files written since 0: every epoch counts)
    from transfuse import distill

    assert distill._progress(distilled, 0.0)() == (4, distilled.distill.epochs, "student epochs")


def test_plan_shows_the_distill_stage():
    from transfuse.plan import plan

    cfg = load_config(Path(__file__).parent.parent / "configs" / "smoke.yaml", BUDGET)
    p = plan(cfg)
    assert p["distill"]["enabled"] and p["distill"]["teacher_labelled_rows"] == 2 * 10 * (40 + 16)
    assert p["compress"]["variants"][-1] == "student_int8"
    assert plan(load_config(None))["distill"] == {"enabled": False}


def test_compress_serves_the_student_as_an_int8_bundle_with_its_temperature(distilled):
    from transfuse.inference.bundle import load_bundle
    from transfuse.data import read_split_numpy

    comp = json.loads((_dir(distilled, "compress") / "metrics.json").read_text())
    assert [r["variant"] for r in comp["variants"]] == ["float32", "int8", "student_int8"]
    b = load_bundle(_dir(distilled, "compress") / "student_int8")
    man = b.manifest
    assert [c["name"] for c in man["cnn_members"]] == ["student"] and not man.get("sklearn_members")
    m = json.loads((_dir(distilled, "distill") / "metrics.json").read_text())
    assert man["combiner"]["temperature"] == pytest.approx(m["calibration"]["temperature"])
    x, y, _ = read_split_numpy(str(_dir(distilled, "data")), "test")
    from transfuse.finetune.predictions import read_member_split

    _, _, keras = read_member_split(str(_dir(distilled, "distill") / "student"), "predictions", "test")
    served = b.predict_proba(x)
    # int8 against the float student at its temperature: the same class nearly everywhere
    assert np.mean(served.argmax(1) == keras.argmax(1)) > 0.9


def test_serve_swaps_the_ensemble_for_the_student_and_back_under_load(distilled):
    """One replica serving the int8 ensemble is reconfigured (only ``user_config`` changes: what a new Serve config
    does) to ``student_int8`` and back while a client keeps sending: every request answered, each answer wholly one
    bundle's offline prediction, the order ensemble -> student -> ensemble, the replica never restarted."""
    import threading

    import httpx
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from bench.serve import free_port
    from serve.app import AppArgs, proxy_options
    from tests._cluster import wait_for
    from transfuse.inference.bundle import load_bundle
    from transfuse.config import ServeConfig
    from transfuse.data import read_split_numpy

    comp = _dir(distilled, "compress")
    paths = {v: str(comp / v) for v in ("int8", "student_int8")}
    offline = {v: load_bundle(p) for v, p in paths.items()}
    x, _, _ = read_split_numpy(str(_dir(distilled, "data")), "test")
    x = x[:16]
    want = {v: b.predict_proba(x) for v, b in offline.items()}
    assert np.abs(want["int8"] - want["student_int8"]).max() > 1e-3  # the two are told apart by their answers
    name = distilled.serve.name

    def config(bundle: str) -> ServeDeploySchema:
        args = AppArgs(bundle=paths["int8"], name=name, num_cpus=0.25, min_replicas=1, max_replicas=1,
                       batch_wait_timeout_s=0.005).model_dump()
        return ServeDeploySchema.model_validate({"applications": [{
            "name": "swap", "route_prefix": "/", "import_path": "serve.app:build_app", "args": args,
            "runtime_env": {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}},
            "deployments": [{"name": "TransfuseModel", "user_config": {"bundle": bundle}}]}]})

    port = free_port()
    serve.start(**proxy_options(ServeConfig(host="127.0.0.1", port=port)))
    base = f"http://127.0.0.1:{port}"
    client = serve_api.serve_start()
    stop = threading.Event()
    answers: list[tuple[int, int, np.ndarray]] = []  # (image index, status, probabilities) in the order received
    sent = [0]

    def client_loop() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                i = sent[0] % len(x)
                sent[0] += 1
                r = c.post(f"{base}/v1/models/{name}:predict", json={"instances": x[i:i + 1].tolist()})
                probs = np.array(r.json()["predictions"][0]["probabilities"]) if r.status_code == 200 else None
                answers.append((i, r.status_code, probs))

    def served(variant: str) -> bool:
        meta = httpx.get(f"{base}/v1/models/{name}").json()
        return meta["bundle"]["checksum"] == offline[variant].checksum

    thread = threading.Thread(target=client_loop, daemon=True)
    try:
        client.deploy_apps(config(paths["int8"]), _blocking=True)
        replica = httpx.get(f"{base}/healthz").json()["replica"]
        thread.start()
        for variant in ("student_int8", "int8"):
            n = len(answers)
            wait_for("20 answers", lambda: len(answers) >= n + 20, 120, 0.1)
            client.deploy_apps(config(paths[variant]))
            wait_for(f"the swap to {variant}", lambda: served(variant), 120, 0.2)
        n = len(answers)
        wait_for("20 answers after the swap back", lambda: len(answers) >= n + 20, 120, 0.1)
        assert httpx.get(f"{base}/healthz").json()["replica"] == replica  # reconfigured in place
    finally:
        stop.set()
        thread.join(timeout=120)
        serve.shutdown()
    assert len(answers) == sent[0] and all(s == 200 for _, s, _ in answers), [s for _, s, _ in answers if s != 200]
    order = []
    for i, _, p in answers:
        match = [v for v in want if np.allclose(p, want[v][i], rtol=0, atol=1e-5)]
        assert len(match) == 1, f"answer for image {i} is neither bundle's offline prediction"
        if not order or order[-1] != match[0]:
            order.append(match[0])
    assert order == ["int8", "student_int8", "int8"], order


def test_the_report_shows_teacher_student_and_best_member(distilled):
    from transfuse.report import write_report

    html = Path(write_report(distilled)).read_text()
    assert "6b. Distillation" in html and "agreement with the teacher" in html
    assert "student_int8 is " in html and "teacher: stacked ensemble" in html
    # the student's reliability diagram beside its teacher's, and its table row from the same predictions
    sec = html[html.index("6b. Distillation"):]
    assert "reliability_student.png" in sec
    assert (Path(REPORT_DIR.dir(distilled)) / "reliability_student.png").stat().st_size > 1000


def test_views_are_the_image_first_then_augmented_by_id_not_by_batch():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 1)).astype(np.uint8)
    batch = {"image": images, "label": np.arange(6), "id": np.array([f"i{k}" for k in range(6)], dtype=object)}
    v0 = augment_view(batch, 0, seed=1, flip=True, pad_crop=2)
    assert np.array_equal(v0["image"], images) and list(v0["view"]) == [0] * 6
    v1 = augment_view(batch, 1, seed=1, flip=True, pad_crop=2)
    assert not np.array_equal(v1["image"], images)
    half = augment_view({k: v[3:] for k, v in batch.items()}, 1, seed=1, flip=True, pad_crop=2)
    assert np.array_equal(half["image"], v1["image"][3:])  # a row's view depends on its id, not its batch
    assert not np.array_equal(augment_view(batch, 1, seed=2, flip=True, pad_crop=2)["image"], v1["image"])


def test_kd_loss_is_t_squared_kl_plus_the_labelled_rows_cross_entropy():
    import tensorflow as tf

    k, t = 3, 2.0
    teacher = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    student = np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    soft = soften(teacher, t)
    target = np.concatenate([soft, np.array([[1, 0, 0], [0, 0, 0]]), np.array([[1.0], [0.0]])], 1)
    got = kd_loss(k, t, soft_weight=0.5, hard_weight=2.0)(tf.constant(target, tf.float32),
                                                            tf.constant(student, tf.float32)).numpy()
    s_t = soften(student, t)
    kl = np.sum(soft * (np.log(soft) - np.log(s_t)), axis=1)
    want = 0.5 * t * t * kl + 2.0 * np.array([-np.log(0.5), 0.0])
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_the_temperature_stacker_is_softmax_of_log_p_over_t():
    p = np.random.default_rng(0).dirichlet(np.ones(4), size=20)
    st = temperature_stacker(1.7, 4)
    np.testing.assert_allclose(st.predict_proba({"student": p}), soften(p, 1.7), rtol=1e-9)
    np.testing.assert_allclose(combine_probs({"student": p}, ["student"], coef=st.coef_, intercept=st.intercept_,
                                             features="log_probs", eps=st.eps), soften(p, 1.7), rtol=1e-9)
    assert soften(p, 1.0).argmax(1).tolist() == soften(p, 3.0).argmax(1).tolist() == p.argmax(1).tolist()


def test_the_teachers_probabilities_do_not_depend_on_how_the_views_were_batched(distilled):
    """Ray Data cuts the teacher's batches where blocks happen to arrive; the same rows in other batches (one of a
    single row, where TensorFlow's kernels round differently) get bit-identical probabilities."""
    from transfuse.data import read_split_numpy
    from transfuse.distill.teacher import TeacherActor
    from transfuse.ensemble.fitted import ensemble_to_compress

    src, _ = ensemble_to_compress(distilled)
    teacher = TeacherActor(list(src.members), src.parts, 2.0, 10, batch_size=distilled.distill.teacher_batch_size)
    x, _, _ = read_split_numpy(str(_dir(distilled, "data")), "test")
    whole = teacher.predict(x)
    order = np.random.default_rng(0).permutation(len(x))
    got = np.empty_like(whole)
    for rows in np.split(order, [1, 2, 40, 41, 200]):
        got[rows] = teacher.predict(x[rows])
    np.testing.assert_array_equal(got, whole)


@pytest.mark.xfail(strict=False, reason="2026-12-03 evening: the forced rerun's student differed (2,727-2,852 of 3,000 "
                   "test probabilities) 4 runs of 4 on this VM, at 28d1bbc too, where CI had passed it that afternoon. "
                   "2026-12-04: passed 2 of 2 and 3 forced reruns under CPU load were identical; one source of "
                   "timing-dependent targets found and removed (the teacher's batch-1 rounding, the test above); "
                   "not proven to be that evening's cause, so the mark stays until it has passed on CI too")
def test_the_same_config_and_seed_give_the_same_student(distilled):
    """Run last: it reruns the stage in place (force), after the tests that read the first run's outputs."""
    from transfuse.distill.stage import run_distill
    from transfuse.finetune.predictions import read_member_split

    student = str(_dir(distilled, "distill") / "student")
    _, _, before = read_member_split(student, "predictions", "test")
    first = json.loads((_dir(distilled, "distill") / "metrics.json").read_text())
    run_distill(distilled, force=True)
    _, _, after = read_member_split(student, "predictions", "test")
    again = json.loads((_dir(distilled, "distill") / "metrics.json").read_text())
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert again["history"] == first["history"] and again["fidelity"] == first["fidelity"]


def _trained(cfg) -> tuple[list[dict], int]:
    """(history, Adam's step count) in the newest checkpoint of the student's Ray Train run."""
    from transfuse.distill.student import read_history
    from transfuse.finetune.stage import latest_checkpoint
    from transfuse.finetune.loop import read_optimizer_state

    with latest_checkpoint(str(_dir(cfg, "distill"))).as_directory() as d:
        return read_history(d), int(read_optimizer_state(d)[0])  # the optimizer's first variable: its step


def test_a_rerun_with_more_epochs_resumes_the_student_with_its_adam_state(distilled):
    """Run after the tests that read the first run's outputs (it retrains the student in place). distill.epochs
    4 -> 5: only epoch 5 trains, from the checkpoint's weights and Adam's state, so Adam's step count goes on (a
    fresh optimizer would be back at one epoch's steps); 5 -> 2: fewer epochs than the checkpoint has trained, so
    the student trains again from the member."""
    from transfuse.distill.stage import run_distill

    def epochs(n: int):
        return distilled.model_copy(update={"distill": distilled.distill.model_copy(update={"epochs": n})})

    from transfuse.finetune.stage import TRAIN_DIR

    def checkpoints() -> list[str]:
        return sorted(p.name for p in (_dir(distilled, "distill") / TRAIN_DIR).glob("checkpoint_*") if p.is_dir())

    history, steps = _trained(distilled)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and steps > 0 and steps % 4 == 0
    fourth = checkpoints()[-1]
    run_distill(epochs(5))
    metrics = json.loads((_dir(distilled, "distill") / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5] and metrics["history"][:4] == history
    assert checkpoints()[0] == fourth  # resumed from it (a run from scratch would have replaced every checkpoint)
    assert _trained(distilled) == (metrics["history"], steps // 4 * 5)
    run_distill(epochs(2))
    again, steps_2 = _trained(distilled)
    assert [h["epoch"] for h in again] == [1, 2] and steps_2 == steps // 4 * 2 and fourth not in checkpoints()


def test_compress_reads_only_an_applied_student_temperature(tmp_path):
    """distill/metrics.json's calibration as run_distill writes it: the temperature compress serves is the applied
    one; one that its check rejected (``applied: false``) is served as no temperature at all."""
    from transfuse.ensemble.stacker import checked_temperature

    z = np.zeros((80, 3))
    z[:, 0] = 3.0
    y = np.zeros(80, dtype=np.int64)
    y[:40:2] = 1
    halves = [np.arange(40), np.arange(40, 80)]  # as in test_stacking: each half's temperature hurts the other
    for check, want in ((True, None), (False, checked_temperature(z, y, check=False)["temperature"])):
        cal = checked_temperature(z, y, [(halves[0], halves[1]), (halves[1], halves[0])], check=check)
        storage.write_json(str(tmp_path / "metrics.json"), {"calibration": cal})
        assert read_temperature(str(tmp_path)) == want
    storage.write_json(str(tmp_path / "metrics.json"), {"calibration": None})  # temperature_scaling: false
    assert read_temperature(str(tmp_path)) is None
