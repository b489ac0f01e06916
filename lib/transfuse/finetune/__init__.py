"""transfuse.finetune."""
