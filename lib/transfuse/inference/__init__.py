"""transfuse.inference."""
