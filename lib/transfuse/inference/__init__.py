"""Inference: what a served bundle needs and nothing more (numpy and the runtimes, no TensorFlow, scikit-learn or
Ray at import): the bundle format (``bundle`` reads and verifies it, ``bundle_writer`` writes it), the LiteRT and
ONNX Runtime adapters (``runtimes``), the image preprocessing every model input goes through (``preprocessing``) and
the combination of member probabilities (``combine``). ``serve/``, ``transfuse predict`` and every stage that
writes or reads a bundle import it; it imports only the core.

The names below are its public face, imported on first use.
"""

from __future__ import annotations

from transfuse.wing import public_face

# name -> module: the public face other wings import from ``transfuse.inference``
_FACE = {
    "Bundle": "transfuse.inference.bundle",
    "BundleError": "transfuse.inference.bundle",
    "MANIFEST": "transfuse.inference.bundle",
    "decode": "transfuse.inference.bundle",
    "fetch": "transfuse.inference.bundle",
    "file_codings": "transfuse.inference.bundle",
    "load_bundle": "transfuse.inference.bundle",
    "verify": "transfuse.inference.bundle",
    "BundleCnn": "transfuse.inference.bundle_writer",
    "BundleSklearn": "transfuse.inference.bundle_writer",
    "example_images": "transfuse.inference.bundle_writer",
    "write_bundle": "transfuse.inference.bundle_writer",
    "EPS": "transfuse.inference.combine",
    "EnsembleError": "transfuse.inference.combine",
    "POOL_EPS": "transfuse.inference.combine",
    "STACKER_METHODS": "transfuse.inference.combine",
    "Stacker": "transfuse.inference.combine",
    "average": "transfuse.inference.combine",
    "combine_probs": "transfuse.inference.combine",
    "hard_vote": "transfuse.inference.combine",
    "load_sklearn_member": "transfuse.inference.combine",
    "row_weights": "transfuse.inference.combine",
    "softmax": "transfuse.inference.combine",
    "stack_members": "transfuse.inference.combine",
    "PreprocessSpec": "transfuse.inference.preprocessing",
    "augment": "transfuse.inference.preprocessing",
    "pixel_features": "transfuse.inference.preprocessing",
    "preprocess": "transfuse.inference.preprocessing",
    "OnnxRunner": "transfuse.inference.runtimes",
}

__getattr__ = public_face(__name__, _FACE)
