"""The config tree: every shipped config validates; bad values fail naming field, value and what is allowed."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT
from transfuse.config import ConfigError, load_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.run


def test_overrides_keep_types():
    cfg = load_config(ROOT / "configs/smoke.yaml",
                      ["train.epochs_frozen=7", "data.classes=[1, 3]", "model.head.dropout=0.25",
                       "serve.api_key=null", "train.use_gpu=false"])
    assert cfg.train.epochs_frozen == 7
    assert cfg.data.classes == [1, 3]
    assert cfg.model.head.dropout == 0.25
    assert cfg.serve.api_key is None


BAD = [
    (["data.sorce=digits"], r"data\.sorce: unknown key"),
    (["data.source=mnist"], r"data\.source = 'mnist'.*'digits'.*'fashion_mnist'"),
    (["train.epochs_frozen=-1"], r"train\.epochs_frozen = -1: Input should be greater than or equal to 0"),
    (["data.split.test=0.8"], r"val \+ test \+ holdout must be < 0\.95"),
    (["train.cache_frozen=true", "train.augment.flip=true"], r"cache_frozen=true cannot be combined"),
    (["serve.min_replicas=5", "serve.max_replicas=2"], r"min_replicas \(5\) must be <= max_replicas \(2\)"),
    (["serve.ingress=nginx"], r"serve\.ingress = 'nginx'.*'proxy'.*'haproxy'"),
    (["serve.ingress=haproxy"], r"ingress 'haproxy' with host '127\.0\.0\.1'.*all interfaces.*0\.0\.0\.0"),
    (["run=a/b"], r"run = 'a/b': must be a plain name"),
    (["data.classes=[3]"], r"data\.classes = \[3\]: needs at least 2 classes"),
    (["data.classes=[1, 1]"], r"must be distinct"),
    (["model.weights=imagenet21k"], r"model\.weights = 'imagenet21k': must be 'imagenet', 'none', 'pretrain'"),
    (["model.backbone=vgg19"], r"model\.backbone = 'vgg19'.*'vgg16'"),
    (["train.use_gpu=true", "train.gpus_per_worker=2"], r"gpus_per_worker must be <= 1, got 2"),
    (["compress.sparsity=[1.5]"], r"each sparsity must be in \(0, 1\), got 1\.5"),
    (["ensemble.members=[{name: a, kind: knn}]"], r"ensemble\.members\.0\.kind = 'knn'"),
    (["noequals"], r"--set expects key\.path=value, got 'noequals'"),
    (["train.batch_size.x=1"], r"'batch_size' is a value, not a section"),
]


@pytest.mark.parametrize("overrides, pattern", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_values_name_the_field(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ROOT / "configs/smoke.yaml", overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_fingerprint_tracks_sections():
    a = load_config(ROOT / "configs/smoke.yaml")
    b = load_config(ROOT / "configs/smoke.yaml", ["train.epochs_frozen=5"])
    assert a.fingerprint("data") == b.fingerprint("data")
    assert a.fingerprint("train") != b.fingerprint("train")
    assert re.fullmatch(r"[0-9a-f]{16}", a.fingerprint())


def test_set_takes_several_pairs_and_repeats():
    """`--set a=1 b=2 --set c=3`, for every job and the transfuse command alike."""
    from jobs._cli import parser
    from transfuse import cli

    args = parser("job").parse_args(["--config", "c.yaml", "--set", "a=1", "b=2", "--set", "c=3"])
    assert args.overrides == ["a=1", "b=2", "c=3"]
    args = cli.parser().parse_args(["run", "photos", "--set", "a=1", "b=2", "--set", "c=3"])
    assert args.overrides == ["a=1", "b=2", "c=3"] and args.data == "photos"
