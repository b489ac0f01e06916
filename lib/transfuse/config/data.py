"""The data section: where the images come from, which classes, and how they are split (fractions or a label
budget)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from transfuse.config.base import Strict

SOURCES = ("digits", "fashion_mnist", "cifar10", "image_folder", "table", "parquet")
FILE_SOURCES = ("image_folder", "table")  # a user's image files: any size, format and mode, named classes
RESIZE_POLICIES = ("pad", "crop", "stretch")  # transfuse.images owns what each does
SPLITS = ("train", "val", "test", "holdout")
UNLABELLED = "unlabelled"  # the split of images without labels (data.unlabelled_per_class): it has no label column
PREPARED_SPLITS = (*SPLITS, UNLABELLED)  # every split the prepare stage can write


class SplitConfig(Strict):
    """Fractions of each class's labelled images per split, stratified; train gets the rest. A split with a
    fraction above 0 gets at least ``MIN_PER_SPLIT`` images of every class."""

    val: float = Field(0.1, ge=0.0, lt=1.0)  # early stopping, the best epoch, Tune's choice of trial
    test: float = Field(0.2, ge=0.0, lt=1.0)  # 0 only with a separate test set (data.test_path / test_from_source)
    holdout: float = Field(0.1, ge=0.0, lt=1.0)  # the stacker's out-of-fold rows

    @model_validator(mode="after")
    def _leave_train(self) -> "SplitConfig":
        total = self.val + self.test + self.holdout
        if total >= 0.95:
            raise ValueError(f"val + test + holdout must be < 0.95 so train keeps examples, got {total:.3f}")
        return self


# the fewest images of each class a split with a fraction above 0 gets: the stacker's cross-validation on the
# holdout needs two rows of every class; train, val and test need one
MIN_PER_SPLIT = {"train": 1, "val": 1, "test": 1, "holdout": 2}


class BudgetSplitConfig(Strict):
    """How the label budget is divided, as fractions of it per class; train gets the rest."""

    val: float = Field(0.2, gt=0.0, lt=1.0)  # early stopping, best epoch, Tune's trial choice
    holdout: float = Field(0.4, ge=0.0, lt=1.0)  # the stacker's out-of-fold predictions

    @model_validator(mode="after")
    def _leave_train(self) -> "BudgetSplitConfig":
        if self.val + self.holdout >= 0.9:
            raise ValueError(f"val + holdout must be < 0.9 of the budget so train keeps labels, got "
                             f"{self.val + self.holdout:.3f}")
        return self


class DataConfig(Strict):
    # image_folder: one subfolder per class, named by the class; table: a CSV or parquet file of (path or URI,
    # label) rows; fashion_mnist / cifar10 / digits: the built-in benchmarks; parquet: the canonical schema
    source: Literal[SOURCES] = "fashion_mnist"  # type: ignore[valid-type]
    path: Optional[str] = None  # folder, file or URI (s3://, gs://); None: the source's default locations
    # a separate labelled test set of the same kind as path (folder or table): every image of path is then used
    # for train, val and holdout, and split.test must be 0
    test_path: Optional[str] = None
    download: bool = False  # allow Keras' downloader when the files are not found locally
    # keep only these classes, relabelled 0..n-1 in this order: class names (any source), or the built-in sources'
    # class ids (Fashion-MNIST's 0..9)
    classes: Optional[list[Union[int, str]]] = None
    # table: the columns holding the image's path (relative to the table's folder, or a URI) and its label;
    # None: the first of path/file/filename/image/uri/url and of label/class/category/target
    path_column: Optional[str] = None
    label_column: Optional[str] = None
    # a user's image files become image_size x image_size (None: model.input_size) uint8 arrays in `channels`
    # (3: RGB, 1: grey) when prepared, and so does every image the served model gets. resize: pad (the default)
    # keeps the whole photo undistorted and pads its short side; crop cuts the long side's ends to a centred
    # square; stretch squashes it to the square
    image_size: Optional[int] = Field(None, ge=8, le=1024)
    channels: Literal[1, 3] = 3
    resize: Literal[RESIZE_POLICIES] = "pad"  # type: ignore[valid-type]
    max_pixels: int = Field(100_000_000, ge=1)  # per image (width x height), from its header before decoding
    limit_per_class: Optional[int] = Field(None, gt=0)  # cap on the pool per class, before splitting (speed)
    train_per_class: Optional[int] = Field(None, gt=0)  # labelled train examples per class (few-label target)
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)  # fraction of the train split kept, stratified
    split: SplitConfig = SplitConfig()
    rows_per_shard: int = Field(4096, gt=0)  # parquet rows per file
    on_bad_file: Literal["error", "skip"] = "error"  # skip: record each bad file in the manifest
    # image files by extension, in any case; other files and hidden ones (".*") are skipped and counted
    image_extensions: list[str] = [".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"]
    # One label budget: B labelled images per class are all that any model (CNNs, scikit-learn members, the
    # stacker) learns from; train, val and holdout are carved from them (budget_split), the test split is apart
    # and the rest of the pool stays unlabelled (counted in the manifest). Replaces split/train_per_class.
    labelled_per_class: Optional[int] = Field(None, ge=5)
    budget_split: BudgetSplitConfig = BudgetSplitConfig()
    test_per_class: Optional[int] = Field(None, gt=0)  # with labelled_per_class: test images per class
    # the test split is the source's own test set (Fashion-MNIST's t10k files, CIFAR-10's test_batch), the labels
    # (the budget, or every image by split fractions with split.test=0) come from its training set
    test_from_source: bool = False
    # with labelled_per_class: this many of each class's remaining training images are written as the
    # ``unlabelled`` split, without a label column (the distill stage's pool); 0: none written
    unlabelled_per_class: int = Field(0, ge=0)
    # Class weights in every learner's loss (the CNNs', the scikit-learn members', the stacker's): each class
    # weighted n / (k * n_class) on the training labels ("balanced", scikit-learn's rule), so a rare class counts
    # as much as a common one. auto: balanced when the largest class has at least imbalance_ratio times the
    # smallest's training images (a user's folder), none otherwise (a balanced benchmark keeps plain losses).
    class_weight: Literal["auto", "balanced", "none"] = "auto"
    imbalance_ratio: float = Field(2.0, ge=1.0)

    @model_validator(mode="after")
    def _budget(self) -> "DataConfig":
        if self.test_path is not None and self.source not in FILE_SOURCES:
            raise ValueError(f"test_path is for a user's files (source {' or '.join(FILE_SOURCES)}), not "
                             f"{self.source!r}; the built-in sources have test_from_source")
        if self.test_path is not None and self.test_from_source:
            raise ValueError("set test_path (a separate test folder or table) or test_from_source, not both")
        separate_test = self.test_path is not None or self.test_from_source
        if self.labelled_per_class is None:
            if self.test_per_class is not None or self.unlabelled_per_class:
                raise ValueError("test_per_class and unlabelled_per_class need labelled_per_class (the label "
                                 "budget)")
            if separate_test and self.split.test != 0:
                raise ValueError(f"split.test is {self.split.test} but the test set is separate (test_path or "
                                 "test_from_source): set split.test=0 so no labelled image is held back twice")
            if not separate_test and self.split.test == 0:
                raise ValueError("split.test is 0 and there is no separate test set: set split.test > 0 or "
                                 "data.test_path")
            return self
        if self.train_per_class is not None or self.train_fraction != 1.0:
            raise ValueError("labelled_per_class (the label budget) replaces train_per_class/train_fraction: "
                             "set one or the other")
        if self.test_per_class is None:
            raise ValueError("labelled_per_class needs test_per_class (how many test images per class)")
        return self

    def budget_counts(self) -> dict[str, int]:
        """Labelled images per class in each split of the budget (val at least one; train gets the rest)."""
        b = int(self.labelled_per_class or 0)
        n_val = max(1, int(round(self.budget_split.val * b)))
        n_holdout = int(round(self.budget_split.holdout * b))
        return {"train": b - n_val - n_holdout, "val": n_val, "holdout": n_holdout}

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, v: Optional[list[Union[int, str]]]) -> Optional[list[Union[int, str]]]:
        if v is not None:
            if len(v) < 2:
                raise ValueError(f"needs at least 2 classes, got {v}")
            if len(set(v)) != len(v) or any(isinstance(c, int) and c < 0 for c in v):
                raise ValueError(f"must be distinct class names or non-negative class ids, got {v}")
        return v

    @field_validator("image_extensions")
    @classmethod
    def _extensions(cls, v: list[str]) -> list[str]:
        bad = [e for e in v if not e.startswith(".") or len(e) < 2]
        if bad or not v:
            raise ValueError(f"must be a non-empty list of extensions starting with '.', got {v}")
        return [e.lower() for e in v]

    @model_validator(mode="after")
    def _class_ids(self) -> "DataConfig":
        if self.source in FILE_SOURCES and self.classes and any(isinstance(c, int) for c in self.classes):
            raise ValueError(f"{self.source} classes are named by their folder or label, so data.classes takes "
                             f"names, got ids {[c for c in self.classes if isinstance(c, int)]}")
        return self

    def separate_test(self) -> bool:
        """Whether the test split is a set apart (test_path, test_from_source) rather than a fraction."""
        return self.test_path is not None or self.test_from_source

    def min_per_class(self) -> int:
        """The fewest labelled images a class needs for the fraction split (``MIN_PER_SPLIT`` per split used)."""
        used = ["train"] + [s for s in ("val", "holdout", "test") if getattr(self.split, s) > 0]
        return sum(MIN_PER_SPLIT[s] for s in used)
