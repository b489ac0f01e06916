"""transfuse: transfer learning and stacked ensembles on Ray."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``transfuse.load(run_or_bundle).predict(...)``: imported on first use, so ``import transfuse`` stays light."""
    if name == "load":
        from transfuse.predict import load

        return load
    raise AttributeError(f"module 'transfuse' has no attribute {name!r}")
