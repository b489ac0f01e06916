"""The Ray Serve application for transfuse bundles (``serve.app:build_app``) and its HTTP client."""
