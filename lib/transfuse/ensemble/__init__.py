"""transfuse.ensemble."""
