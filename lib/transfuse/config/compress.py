"""The compress section: pruning, quantization, the exported variants and the one served, and how the bundle is
stored."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from transfuse.config.base import Strict

AUTO_VARIANT = "auto"  # compress.serve_variant chosen by measurement (compress.choose_served)
STUDENT_VARIANT = "student_int8"  # the distilled student as an int8 bundle (compress adds it when distilling)


class CompressConfig(Strict):
    """Pruning, quantization and the bundle. ``variants`` lists kinds; ``pruned`` and ``pruned_int8`` expand to one
    variant per ``sparsity`` named by it (``pruned50``, ``pruned80_int8``): see ``variant_names()``."""

    sparsity: list[float] = [0.5]  # target fractions of zero weights; each one is exported
    prune_scope: Literal["trainable", "all"] = "trainable"  # trainable: only the layers each member fine-tuned
    prune_distill: bool = True  # fine-tune toward the float member's embedding + probabilities (what sklearn reads)
    prune_epochs: int = Field(1, ge=1)  # fine-tune at the target sparsity
    prune_frequency: int = Field(10, ge=1)  # steps between pruning updates: low, for short fine-tunes
    prune_schedule: Literal["constant", "polynomial"] = "constant"  # constant: target from step 0; polynomial: ramp
    prune_ramp: float = Field(1.0, gt=0.0, le=1.0)  # polynomial: fraction of the fine-tune spent ramping up
    prune_lr: float = Field(3e-4, gt=0.0)  # Adam, for the fine-tune at the target sparsity
    prune_batch_size: int = Field(64, ge=1)
    sparsity_tolerance: float = Field(0.02, ge=0.0, lt=0.5)  # a layer below target - tolerance fails the run
    share_trunk: bool = True  # export the members' shared frozen layers once (the trunk runs once per request)
    # every CNN member in one multi-output graph (trunk once inside): one interpreter call per request instead of
    # trunk + one per member, which saves each call's overhead (most for int8, whose calls are shortest)
    merge_members: bool = True
    optimize_sklearn: bool = True  # lossless, verified rewrites of the sklearn ONNX graphs (every variant)
    # members the stacker gives exactly zero weight (the log pool's w_m = 0) cannot change a prediction: every
    # variant leaves them out (a CNN member stays while a kept sklearn member reads its embedding)
    drop_zero_weight_members: bool = True
    latency_runs: int = Field(100, ge=5)  # batch-1 calls timed per variant (p50, p99)
    throughput_runs: int = Field(10, ge=1)  # batch-32 calls timed per variant
    variants: list[Literal["float32", "pruned", "int8", "pruned_int8", "float16", "dynamic_int8"]] = [
        "float32", "pruned", "int8", "pruned_int8", "float16",
    ]
    # one of variant_names() (e.g. int8, pruned50_int8), student_int8 (distill), or auto: the fastest variant whose
    # answers agree with float32's on at least 100 + goals.served_accuracy_points percent of the labelled train and
    # val images (so it can lose no more than that there; never chosen on test), else float32; needs float32
    serve_variant: str = "int8"
    representative_examples: int = Field(200, ge=1)  # drawn from train for int8 calibration
    # threads per LiteRT/ORT model: at batch 1 on a small shared machine, more threads than 1 fight over the cores
    # and are much slower
    num_threads: int = Field(1, ge=1)
    # how every variant stores its model files (bundle.CODINGS): gzip, decoded in memory when a replica loads the
    # bundle, is Deep Compression's last stage with a stock codec; int8 files shrink more (their per-channel
    # zero points are int64 zeros) than float32 ones
    coding: Literal["none", "gzip"] = "gzip"

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: list[float]) -> list[float]:
        for s in v:
            if not 0.0 < s < 1.0:
                raise ValueError(f"each sparsity must be in (0, 1), got {s}")
        names = [pruned_name(s) for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"sparsity values must be distinct (variants are named by them), got {v}")
        return v

    def variant_names(self) -> list[str]:
        """The exported variants in order: pruned kinds once per sparsity."""
        return expand_variants(list(self.variants), list(self.sparsity))

    @model_validator(mode="after")
    def _serve_variant(self) -> "CompressConfig":
        names = self.variant_names()
        if self.serve_variant == AUTO_VARIANT:
            if "float32" not in names:
                raise ValueError(f"serve_variant 'auto' compares every variant with float32: add float32 to "
                                 f"variants (got {names})")
            return self
        if self.serve_variant not in names and self.serve_variant != STUDENT_VARIANT:
            raise ValueError(f"serve_variant {self.serve_variant!r} is not an exported variant; allowed (from "
                             f"variants {self.variants} and sparsity {self.sparsity}): {names}")
        return self


def expand_variants(variants: list[str], sparsity: list[float]) -> list[str]:
    """Variant names from kinds: ``pruned``/``pruned_int8`` once per sparsity (``pruned50``, ``pruned50_int8``);
    names already expanded pass through."""
    out: list[str] = []
    for v in variants:
        if v in ("pruned", "pruned_int8"):
            out += [pruned_name(s) + v[len("pruned"):] for s in sparsity]
        else:
            out.append(v)
    return list(dict.fromkeys(out))


def pruned_name(sparsity: float) -> str:
    """The variant name of a pruned member set: 0.5 -> pruned50, 0.875 -> pruned87p5."""
    return "pruned" + f"{100 * sparsity:g}".replace(".", "p")
