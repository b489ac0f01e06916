"""transfuse: transfer learning and stacked ensembles on Ray."""

__version__ = "0.1.0"
