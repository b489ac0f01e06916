"""transfuse.compress."""
