"""Shared fixtures: one local Ray cluster per test session, small real datasets prepared once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from transfuse import runtime  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow is imported)
from transfuse.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def smoke_config(storage: Path, run: str = "smoke", overrides: list[str] | None = None) -> Config:
    """configs/smoke.yaml with outputs under ``storage``."""
    return load_config(ROOT / "configs" / "smoke.yaml", [f"storage={storage}", f"run={run}", *(overrides or [])])


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster. 4 logical CPUs on a 2-core machine: Tune + Train V2 trials deadlock at 2
    (ray-project/ray#54305), and Serve replicas need room beside them."""
    import ray

    runtime.init_ray(num_cpus=int(os.environ.get("TRANSFUSE_TEST_CPUS", "4")))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_run(ray_cluster, tmp_path_factory) -> Config:
    """The smoke config with scikit-learn's digits prepared once for the whole session."""
    from transfuse.data import prepare

    cfg = smoke_config(tmp_path_factory.mktemp("runs"))
    prepare(cfg)
    return cfg


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST idx files absent: install the Debian package dataset-fashion-mnist")
    return FASHION_DIR
