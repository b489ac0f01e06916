"""A user's own photos end to end: a messy folder (every size, format and colour mode, an EXIF-rotated phone shot,
upper-case extensions, a truncated and an empty file, junk and hidden files, a class name with a space, 8x
imbalance) and a CSV of paths with string labels, through `transfuse plan`, `transfuse run`, `transfuse predict`
(offline and on Ray Data), the Python API and the served endpoint on every protocol, all answering with the
user's class names."""

from __future__ import annotations

import base64
import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, _free_port
from transfuse import cli, images
from transfuse.data import files as data_files
from transfuse.data import messy

# 8x imbalanced, a class name with a space; Fashion-MNIST ids drawn for each name
COUNTS = {"trouser": 48, "ankle boot": 24, "dress": 16, "sandal": 10, "sneaker": 6}
IDS = [1, 9, 3, 5, 7]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def photos(fashion_dir, tmp_path_factory) -> messy.MessyFolder:
    return messy.write(tmp_path_factory.mktemp("photos") / "my photos", COUNTS, classes=IDS, seed=0)


def _good_files(folder: messy.MessyFolder) -> list[Path]:
    return [p for ps in folder.files.values() for p in ps]


# ------------------------------------------------------------------------------------------ decoding (no Ray)


def test_every_format_and_mode_decodes_to_the_policy_shape(photos):
    for policy in (images.ImagePolicy(size=40), images.ImagePolicy(size=24, channels=1, resize="crop")):
        seen = set()
        for p in _good_files(photos):
            with open(p, "rb") as f:
                h = images.header(f.read(), str(p))
            seen.add((h.format, h.mode))
            x = images.load(p, policy)
            assert x.shape == policy.shape and x.dtype == np.uint8, p
        formats = {f for f, _ in seen}
        modes = {m for _, m in seen}
        assert formats == set(images.FORMATS)
        assert {"L", "LA", "RGB", "RGBA", "P", "I;16", "CMYK"} <= modes


def test_exif_rotated_photo_comes_out_upright(photos):
    pol = images.ImagePolicy(size=64, resize="stretch")
    x = images.load(photos.rotated, pol).astype(int)
    upright = images.load(images._open(messy.encode(photos.upright[photos.rotated], "PNG", "RGB"), "u"), pol)
    upright = upright.astype(int)
    assert np.abs(x - upright).mean() < 4  # JPEG noise only
    assert np.abs(np.rot90(x) - upright).mean() > 4 * np.abs(x - upright).mean()  # the rotation mattered


def test_modes_are_converted_by_their_meaning():
    from PIL import Image

    def png(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    grey16 = Image.fromarray(np.array([[0, 32896, 65535, 257]], np.uint16))  # I;16: scaled by 1/257, not clipped
    assert images.decode(png(grey16), images.ImagePolicy(size=1, width=4, channels=1, resize="stretch"))[0, :, 0] \
        .tolist() == [0, 128, 255, 1]
    clear = Image.new("RGBA", (2, 2), (10, 20, 30, 0))  # fully transparent: the white background shows
    assert images.decode(png(clear), images.ImagePolicy(size=2)).min() == images.BACKGROUND
    wide = Image.new("RGB", (40, 10), (200, 100, 50))  # pad: the short side padded, the photo undistorted
    x = images.decode(png(wide), images.ImagePolicy(size=20, resize="pad"))
    assert (x[:7] == images.PAD_VALUE).all() and (x[13:] == images.PAD_VALUE).all()
    assert (x[8:12] == [200, 100, 50]).all()
    assert (images.decode(png(wide), images.ImagePolicy(size=20, resize="crop")) == [200, 100, 50]).all()


@pytest.mark.parametrize("data, policy, error, pattern", [
    (b"", images.ImagePolicy(size=8), images.ImageFormatError, r"f\.png: not an image \(allowed: JPEG, PNG"),
    (b"hello world", images.ImagePolicy(size=8), images.ImageFormatError, "not an image"),
    ("PPM", images.ImagePolicy(size=8), images.ImageFormatError, "format PPM is not allowed; allowed: JPEG"),
    ("BIG", images.ImagePolicy(size=8, max_pixels=399), images.ImageTooLargeError,
     r"20 x 20 = 0.0 megapixels; at most 0.000399 megapixels \(399 pixels\)"),
    ("HALF_JPEG", images.ImagePolicy(size=8), images.ImageError, "truncated or corrupt"),
])
def test_bad_images_are_named_with_what_is_allowed(data, policy, error, pattern):
    from PIL import Image

    img = Image.new("RGB", (20, 20), (1, 2, 3))
    if data == "HALF_JPEG":  # large enough that its first half holds the whole header
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    if data in ("PPM", "BIG", "HALF_JPEG"):
        buf = io.BytesIO()
        img.save(buf, {"PPM": "PPM", "BIG": "PNG", "HALF_JPEG": "JPEG"}[data])
        data = buf.getvalue()[: len(buf.getvalue()) // 2] if data == "HALF_JPEG" else buf.getvalue()
    with pytest.raises(error, match=pattern):
        images.decode(data, policy, "f.png")


def test_folder_listing_skips_and_counts_junk(photos):
    listing = data_files.list_folder(str(photos.root), list(images.EXTENSIONS))
    assert listing.classes == sorted(COUNTS)
    counts = listing.class_counts()
    assert counts["sneaker"] == COUNTS["sneaker"] + 1  # + its truncated file, found bad only when decoded
    assert counts["trouser"] == COUNTS["trouser"] + 2  # + the rotated photo and the empty file
    skipped = {Path(i["path"]).name: i["reason"] for i in listing.ignored}
    assert skipped == {".DS_Store": "hidden file", "._img_0000.jpg": "hidden file",
                       "notes.txt": skipped["notes.txt"]} and skipped["notes.txt"].startswith("not an image")
    assert any(i.endswith(".PNG") for _, i, _ in listing.files)  # upper-case extensions are images too


def _table(photos: messy.MessyFolder, tmp_path: Path, extra: list[tuple[str, str]] = ()) -> Path:
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "category"])
        for name, ps in photos.files.items():
            for p in ps:
                # relative to the table's folder (absolute for GIFs: both forms are allowed)
                w.writerow([os.path.relpath(p, tmp_path) if p.suffix != ".gif" else str(p), name])
        for p in photos.bad:
            w.writerow([str(p), p.parent.name])
        w.writerows(extra)
    return path


def test_table_listing_reads_paths_and_string_labels(photos, tmp_path):
    import shutil

    shutil.copytree(photos.root, tmp_path / photos.root.name)  # relative paths resolve against the table's folder
    local = messy.MessyFolder(tmp_path / photos.root.name, {k: [tmp_path / photos.root.name / p.relative_to(
        photos.root) for p in v] for k, v in photos.files.items()}, [tmp_path / photos.root.name /
                                                                     p.relative_to(photos.root) for p in photos.bad])
    table = _table(local, tmp_path, [("gone.jpg", "dress")])
    listing = data_files.list_table(str(table), None, None, list(images.EXTENSIONS))
    assert listing.classes == sorted(COUNTS)
    assert listing.bad == [{"id": "gone.jpg", "reason": "file not found"}]
    assert len(listing.files) == sum(len(v) for v in local.files.values()) + len(local.bad)
    with pytest.raises(data_files.DataError, match="listed twice"):
        data_files.list_table(str(_table(local, tmp_path, [("gone.jpg", "dress")] * 2)), None, None, [".jpg"])
    with pytest.raises(data_files.DataError, match=r"no label column; name one of \['label'"):
        data_files.list_table(str(_write(tmp_path / "t.csv", "path,kind\na.jpg,x\n")), None, None, [".jpg"])
    with pytest.raises(data_files.DataError, match=r"data.label_column 'nope' is not a column"):
        data_files.list_table(str(table), None, "nope", [".jpg"])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ plan (no Ray)


def test_plan_lists_classes_and_bad_files_without_ray(photos):
    """In a process of its own, so that the session's Ray connection cannot hide one the plan made."""
    import subprocess
    import sys

    probe = ("import sys, ray; from transfuse import cli; rc = cli.main(sys.argv[1:]); "
             "print('RAY-STARTED' if ray.is_initialized() else 'NO-RAY', file=sys.stderr); sys.exit(rc)")

    def plan(*more: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", probe, "plan", str(photos.root), *more], capture_output=True,
                              text=True, timeout=300, cwd=str(ROOT))

    r = plan()
    assert r.returncode == 2 and "NO-RAY" in r.stderr, r.stderr
    for name in COUNTS:
        assert name in r.stdout
    assert "sneaker/truncated.jpg" in r.stdout and "trouser/empty.png: empty file" in r.stdout
    assert "--set data.on_bad_file=skip" in r.stderr and "sneaker/truncated.jpg" in r.stderr
    assert "2 hidden file" in r.stdout
    r = plan("--set", "data.on_bad_file=skip", "data.split.holdout=0.3")
    assert r.returncode == 0 and "NO-RAY" in r.stderr, r.stderr
    assert "96 x 96 x 3 (pad)" in r.stdout


def test_plan_refuses_a_class_too_small_for_the_split(photos, capsys):
    rc = cli.main(["plan", str(photos.root), "--set", "data.on_bad_file=skip", "data.classes=[sneaker, trouser]",
                   "data.split.test=0.2"])
    assert rc == 0
    small = COUNTS["sneaker"]
    rc = cli.main(["plan", str(photos.root), "--set", "data.on_bad_file=skip", "data.split.val=0.5"])
    _out, err = capsys.readouterr()
    assert rc == 2
    # at val 0.5 the smallest class cannot keep train and holdout images: named, with its count and the minimum
    assert f"'sneaker' has {small}" in err and "each class needs at least 9 for the split fractions (val 0.5" in err


@pytest.mark.parametrize("overrides, pattern", [
    (["data.classes=[1, 2]"], r"image_folder classes are named by their folder or label, so data.classes takes "
                              r"names, got ids \[1, 2\]"),
    (["data.classes=[trouser, coat]"], r"data.classes names \['coat'\], which the data does not have; its classes"),
    (["data.test_path=/nowhere", "data.split.test=0.2"], r"split.test is 0.2 but the test set is separate"),
    (["data.resize=squash"], r"data.resize = 'squash'"),
])
def test_bad_data_settings_are_refused_before_ray(photos, capsys, overrides, pattern):
    import re

    rc = cli.main(["plan", str(photos.root), "--set", "data.on_bad_file=skip", *overrides])
    _out, err = capsys.readouterr()
    assert rc == 2 and re.search(pattern, err), err


def test_runs_are_named_after_the_data_and_never_overwritten(tmp_path):
    from transfuse import runs
    from transfuse.config import load_config

    cfg = load_config(cli.USER_DEFAULTS, [f"storage={tmp_path}", "run=" + runs.name_for("/x/my photos/")])
    assert cfg.run == "my_photos"
    first = runs.claim(cfg, named=False)
    assert first.run == "my_photos" and runs.claim(cfg, named=False).run == "my_photos"  # same config: resumes
    other = cfg.model_copy(update={"seed": 1})
    assert runs.claim(other, named=False).run == "my_photos-2"
    assert runs.claim(other, named=False).run == "my_photos-2"
    with pytest.raises(runs.RunError, match="holds another config's outputs"):
        runs.claim(cfg.model_copy(update={"seed": 7}), named=True)
    assert runs.open_run("my_photos", str(tmp_path)).seed == 0
    assert runs.name_for("s3://bucket/labels.csv") == "labels"


# ------------------------------------------------------------------------------------------ end to end (Ray)


def _run(data: str, storage: Path, *more: str) -> int:
    return cli.main(["run", data, "--config", SMOKE, "--storage", str(storage), "--verbose",
                     "--set", "data.on_bad_file=skip", "serve.name=mine", "compress.serve_variant=auto", *more])


@pytest.fixture(scope="module")
def folder_run(ray_cluster, photos, tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("runs")
    assert _run(str(photos.root), storage) == 0
    return storage / "my_photos"


def test_run_on_a_folder_keeps_names_weights_and_bad_files(folder_run, photos):
    import json

    data = json.loads((folder_run / "data" / "manifest.json").read_text())
    assert data["class_names"] == sorted(COUNTS)
    assert sorted(r["id"] for r in data["skipped"]["rows"]) == ["sneaker/truncated.jpg", "trouser/empty.png"]
    assert data["ignored_files"]["count"] == 3
    assert sum(data["totals"].values()) == sum(COUNTS.values()) + 1  # + the rotated photo
    assert data["image_policy"]["resize"] == "pad" and data["image_shape"] == [32, 32, 3]
    bundle = json.loads((folder_run / "bundle" / "manifest.json").read_text())
    assert bundle["class_names"] == sorted(COUNTS)
    assert bundle["input_spec"]["image_policy"]["resize"] == "pad"
    # serve_variant auto: int8 only where it agrees with float32 on the labelled train + val images, recorded
    comp = json.loads((folder_run / "compress" / "metrics.json").read_text())
    choice = comp["serve_choice"]
    assert set(choice["agreement"]) == {"float32", "int8"} and choice["agreement"]["float32"] == 1.0
    assert choice["n"] == data["totals"]["train"] + data["totals"]["val"]
    int8_kept = choice["agreement"]["int8"] >= 1 - 0.005 - 1e-12  # smoke.yaml: served_accuracy_points -0.5
    assert comp["served"] == choice["served"] == bundle["variant"] == ("int8" if int8_kept else "float32")
    assert (folder_run / "report" / "index.html").is_file()
    assert (folder_run / "config.yaml").is_file()


@pytest.fixture(scope="module")
def new_photos(photos, tmp_path_factory) -> messy.MessyFolder:
    """Pictures the run never saw (other Fashion-MNIST images), every format, plus one undecodable file."""
    return messy.write(tmp_path_factory.mktemp("new"), {k: 3 for k in COUNTS}, classes=IDS, seed=5, offset=200)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_offline_agrees_with_every_serving_protocol(folder_run, new_photos, tmp_path):
    import httpx
    import tritonclient.grpc as grpcclient
    from ray import serve

    from serve.app import deploy
    from transfuse import runs

    out = tmp_path / "preds.csv"
    rc = cli.main(["predict", str(folder_run), str(new_photos.root), "--out", str(out)])
    assert rc == 1  # the undecodable files are listed, not dropped: a non-zero exit says so
    rows = {r["file"]: r for r in _csv_rows(out)}
    bad = {str(p) for p in new_photos.bad}
    assert {f for f, r in rows.items() if r["error"]} == bad
    names = sorted(COUNTS)
    files = [p for p in _good_files(new_photos)]
    offline = np.array([[float(rows[str(p)][c]) for c in names] for p in files])
    assert all(rows[str(p)]["class"] == names[int(i)] for p, i in zip(files, offline.argmax(1)))

    api = __import__("transfuse").load(folder_run).predict([str(p) for p in files])
    np.testing.assert_allclose(api.probabilities, offline, atol=2e-6)
    assert api.labels == [rows[str(p)]["class"] for p in files]

    cfg = runs.open_run(str(folder_run), overrides=[f"serve.port={_free_port()}", f"serve.grpc_port={_free_port()}"])
    url = deploy(cfg.serve, str(folder_run / "bundle"), app_name="mine")
    try:
        up = httpx.post(f"{url}/images", files=[("files", (p.name, p.read_bytes())) for p in files], timeout=120)
        assert up.status_code == 200, up.text
        served = np.array([r["probabilities"] for r in up.json()["predictions"]])
        np.testing.assert_allclose(served, offline, atol=2e-6)
        assert [r["label"] for r in up.json()["predictions"]] == api.labels
        b64 = httpx.post(f"{url}:predict", json={"instances": [{"b64": base64.b64encode(p.read_bytes()).decode()}
                                                               for p in files[:4]]}, timeout=60)
        assert [r["label"] for r in b64.json()["predictions"]] == api.labels[:4]
        v2 = httpx.post(url.replace("/v1/models/", "/v2/models/") + "/infer", timeout=60, json={"inputs": [{
            "name": "images", "shape": [4], "datatype": "BYTES",
            "data": [base64.b64encode(p.read_bytes()).decode() for p in files[:4]]}]})
        labels = next(o for o in v2.json()["outputs"] if o["name"] == "label")["data"]
        assert labels == api.labels[:4]
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{cfg.serve.grpc_port}")
        t = grpcclient.InferInput("images", [4], "BYTES")
        t.set_data_from_numpy(np.array([p.read_bytes() for p in files[:4]], dtype=object))
        got = client.infer("mine", [t]).as_numpy("label")
        assert [g.decode() for g in got] == api.labels[:4]
    finally:
        serve.shutdown()


def test_predict_on_ray_data_matches_offline(folder_run, new_photos, tmp_path):
    offline, on_ray = tmp_path / "a.csv", tmp_path / "b.csv"
    assert cli.main(["predict", str(folder_run), str(new_photos.root), "--out", str(offline), "--keep-going"]) == 0
    assert cli.main(["predict", str(folder_run), str(new_photos.root), "--out", str(on_ray), "--ray",
                     "--actors", "1", "--keep-going"]) == 0
    a = sorted(_csv_rows(offline), key=lambda r: r["file"])
    b = sorted(_csv_rows(on_ray), key=lambda r: r["file"])
    assert [r["file"] for r in a] == [r["file"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["class"] == rb["class"] and ra["error"] == rb["error"]
        for c in COUNTS:
            if ra[c]:
                assert abs(float(ra[c]) - float(rb[c])) < 2e-6


def test_run_on_a_csv_of_paths_and_string_labels(ray_cluster, photos, tmp_path):
    import json

    table = _table(photos, tmp_path)
    assert _run(str(table), tmp_path / "runs", "--run", "from_csv") == 0
    data = json.loads((tmp_path / "runs" / "from_csv" / "data" / "manifest.json").read_text())
    assert data["class_names"] == sorted(COUNTS)
    assert len(data["skipped"]["rows"]) == 2
    assert (tmp_path / "runs" / "from_csv" / "bundle" / "manifest.json").is_file()


def test_report_command_rewrites_the_runs_report(folder_run, capsys):
    page = folder_run / "report" / "index.html"
    page.unlink()
    assert cli.main(["report", str(folder_run)]) == 0
    assert page.is_file() and str(page) in capsys.readouterr().out
    html = page.read_text()
    assert "ankle boot" in html  # the user's class names, not ids


def test_serve_command_keeps_serving_until_ctrl_c(folder_run, new_photos):
    """`transfuse serve RUN` on a laptop: it starts its own Ray, serves until Ctrl-C, then exits cleanly."""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "transfuse.cli", "serve", str(folder_run), "--set",
                             f"serve.port={port}", "ray.num_cpus=2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    try:
        deadline, answer = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None:
            try:
                photo = new_photos.files["dress"][0]
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/models/mine/images", timeout=30,
                                    files=[("files", (photo.name, photo.read_bytes()))])
                if answer.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert answer is not None and answer.status_code == 200, proc.stdout.read() if proc.poll() else answer
        assert answer.json()["predictions"][0]["label"] in COUNTS
        time.sleep(3)
        assert proc.poll() is None, "the server stopped by itself"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "Ctrl-C stops" in out
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------------------------------ object storage


@pytest.fixture(scope="module")
def bucket(photos, tmp_path_factory):
    """The messy folder and a CSV of it in a bucket of a real S3-compatible server on 127.0.0.1 (moto_server),
    reached through pyarrow's S3 filesystem as any s3:// URI is (AWS_ENDPOINT_URL points it here)."""
    import subprocess
    import sys
    import time

    import boto3

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        deadline = time.time() + 60
        while True:
            try:
                s3.create_bucket(Bucket="photos")
                break
            except Exception:  # the server is still starting
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        rows = ["path,label"]
        for p in photos.root.rglob("*"):
            if p.is_file():
                key = f"mine/{p.relative_to(photos.root)}"
                s3.put_object(Bucket="photos", Key=key, Body=p.read_bytes())
                if not p.name.startswith(".") and p.suffix.lower() != ".txt":
                    rows.append(f"{p.relative_to(photos.root)},{p.parent.name}")
        s3.put_object(Bucket="photos", Key="mine/labels.csv", Body=("\n".join(rows) + "\n").encode())
        yield "s3://photos/mine"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_bucket_folder_and_table_plan_like_local_files(bucket, capsys):
    listing = data_files.list_folder(bucket, list(images.EXTENSIONS))
    assert listing.classes == sorted(COUNTS)
    assert all(f.startswith("s3://photos/mine/") for f, _, _ in listing.files)
    rc = cli.main(["plan", bucket, "--set", "data.on_bad_file=skip"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "sneaker/truncated.jpg" in out and "ankle boot" in out
    table = data_files.list_table(f"{bucket}/labels.csv", None, None, list(images.EXTENSIONS))
    assert table.classes == sorted(COUNTS) and not table.bad
    assert all(f.startswith("s3://photos/mine/") for f, _, _ in table.files)
    x, errors = data_files.decode_files([f for f, _, _ in table.files[:8]], [i for _, i, _ in table.files[:8]],
                                        images.ImagePolicy(size=32))
    assert x.shape == (8, 32, 32, 3) and errors == [""] * 8


def test_predict_reads_a_bucket_folder(folder_run, bucket, tmp_path):
    out = tmp_path / "p.csv"
    assert cli.main(["predict", str(folder_run), f"{bucket}/dress", "--out", str(out)]) == 0
    rows = _csv_rows(out)
    assert len(rows) == COUNTS["dress"]
    assert all(r["file"].startswith(f"{bucket}/dress/") and r["class"] in COUNTS for r in rows)
