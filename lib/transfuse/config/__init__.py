"""One validated configuration tree for every stage.

Loaded from YAML, overridden with ``--set key.path=value``, validated once by pydantic. Unknown keys are
errors. A validation error names the field, the value it got and what is allowed (``ConfigError``).
This package sits at the bottom of the package tree: it imports nothing else from ``transfuse`` but its error base.
One module per group of sections, each re-exported here (import them from ``transfuse.config``):

- ``config.base``: the error and the strict model base;
- ``config.data``: the data section (sources, classes, splits, the label budget);
- ``config.train``: the CNN sections (model, train, pretrain, tune, distill);
- ``config.ensemble``: the ensemble's members, their search space and the stacker;
- ``config.compress``: pruning, quantization, the variants and the served one;
- ``config.serve``: the Ray Serve application;
- this module: the ray and goals sections, the root ``Config``, fingerprints and the YAML loading.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from transfuse.config.base import ConfigError, Strict
from transfuse.config.compress import AUTO_VARIANT, STUDENT_VARIANT, CompressConfig, expand_variants, pruned_name
from transfuse.config.data import (FILE_SOURCES, MIN_PER_SPLIT, PREPARED_SPLITS, RESIZE_POLICIES, SOURCES, SPLITS,
                                   UNLABELLED, BudgetSplitConfig, DataConfig, SplitConfig)
from transfuse.config.ensemble import (MEMBER_FEATURES, MEMBER_KINDS, MEMBER_SAMPLERS, EnsembleConfig, MemberConfig,
                                       MemberSearchConfig)
from transfuse.config.serve import ALL_INTERFACES, ServeConfig
from transfuse.config.train import (BACKBONES, UNFREEZE_UNITS, AugmentConfig, DistillConfig, HeadConfig, ModelConfig,
                                    PretrainConfig, TrainConfig, TuneConfig)


class RayConfig(Strict):
    address: Optional[str] = None  # None: connect to RAY_ADDRESS or start a local cluster
    num_cpus: Optional[int] = Field(None, ge=1)  # logical CPUs of a local cluster


class GoalsConfig(Strict):
    """What the report's verdict checks; each row is marked met or missed. Accuracy margins are in points (1 point
    = 0.01 test accuracy, the first model minus the second, at least this); the served variant (compress.
    serve_variant, int8 by default) is held to its ratios against float32 measured in the same run."""

    transfer_vs_scratch_points: float = 0.0  # the tuned CNN (searched depth) minus the same net from scratch
    transfer_vs_pixels_points: float = 0.0  # the tuned CNN minus a logistic regression on the pixels
    searched_vs_seed_points: float = 0.0  # the best searched unfreeze depth minus the seed's fixed depth
    stack_vs_best_member_points: float = 0.0  # the stacked ensemble minus its best single member
    served_accuracy_points: float = Field(-0.5, le=0.0)  # served variant minus float32: at most 0.5 points lost
    served_smaller: float = Field(4.0, gt=0.0)  # float32 model bytes / the served variant's, at least
    served_faster: float = Field(3.0, gt=0.0)  # batch-1 speed-up of the served variant over float32, at least


class Config(Strict):
    storage: str = "./runs"  # local folder or URI (s3://bucket/prefix, gs://...)
    run: str = "default"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    tune: TuneConfig = TuneConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    distill: DistillConfig = DistillConfig()
    compress: CompressConfig = CompressConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()
    goals: GoalsConfig = GoalsConfig()

    @field_validator("storage")
    @classmethod
    def _absolute_storage(cls, v: str) -> str:
        """A local folder is made absolute once: Tune trials and Ray workers run in other working dirs."""
        if "://" in v and not v.startswith("file://"):
            return v
        return str(Path(v.removeprefix("file://")).expanduser().absolute())

    @field_validator("run")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"must be a plain name (no '/', not starting with '.'), got {v!r}")
        return v

    @model_validator(mode="after")
    def _distill(self) -> "Config":
        if self.distill.enabled and not self.data.unlabelled_per_class:
            raise ValueError("distill.enabled needs an unlabelled pool: set data.unlabelled_per_class (with "
                             "data.labelled_per_class)")
        if self.compress.serve_variant == STUDENT_VARIANT and not self.distill.enabled:
            raise ValueError(f"compress.serve_variant {STUDENT_VARIANT!r} needs distill.enabled")
        return self

    def fingerprint(self, *sections: str) -> str:
        """sha256 of the named sections (all when none): a stage is complete only for the same inputs."""
        d = self.model_dump(mode="json")
        if sections:
            d = {k: d[k] for k in sections}
        return digest(d)


def digest(obj: Any) -> str:
    """A short, stable sha256 of JSON-able ``obj``: the fingerprint stages compare against their manifests."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (value {e['input']!r}); check the spelling against the config tree")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc} = {e['input']!r}: {msg}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """A --set value is parsed as YAML, so 3, 0.5, true, [1, 2] and null keep their types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {p!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def load_config(path: Union[str, Path, None] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read YAML (or defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        source = str(p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top, got {type(data).__name__}")
    return config_from(data, overrides, source)


def config_from(data: dict, overrides: Optional[list[str]] = None, source: str = "defaults") -> Config:
    """A config from a mapping (a YAML file's, a run's saved one) with ``--set`` overrides applied, validated."""
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set " + " ".join(overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None




__all__ = [
    "ALL_INTERFACES", "AUTO_VARIANT", "BACKBONES", "FILE_SOURCES", "MEMBER_FEATURES", "MEMBER_KINDS",
    "MEMBER_SAMPLERS", "MIN_PER_SPLIT", "PREPARED_SPLITS", "RESIZE_POLICIES", "SOURCES", "SPLITS",
    "STUDENT_VARIANT", "UNFREEZE_UNITS", "UNLABELLED",
    "AugmentConfig", "BudgetSplitConfig", "CompressConfig", "Config", "ConfigError", "DataConfig", "DistillConfig",
    "EnsembleConfig", "GoalsConfig", "HeadConfig", "MemberConfig", "MemberSearchConfig", "ModelConfig",
    "PretrainConfig", "RayConfig", "ServeConfig", "SplitConfig", "Strict", "TrainConfig", "TuneConfig",
    "apply_overrides", "config_from", "digest", "expand_variants", "load_config", "pruned_name",
]
