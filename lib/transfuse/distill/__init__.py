"""transfuse.distill."""
