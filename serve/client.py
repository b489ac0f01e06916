"""A small client for the transfuse Serve app: classify image files or a JSON instances file, print top classes.

    python -m serve.client --url http://127.0.0.1:8000 --model smoke digit.png other.jpg
    python -m serve.client --url http://127.0.0.1:8000 --model smoke --instances batch.json --top 3
    python -m serve.client --url http://127.0.0.1:8000 --model smoke --info

``--instances`` takes a JSON file holding ``{"instances": [...]}`` or a bare list of images. The API key comes
from ``--api-key`` or the TRANSFUSE_API_KEY environment variable. Exit status 1 on an HTTP error (its JSON error
is printed), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
from pathlib import Path
from typing import Any, Optional

import httpx


def _headers(api_key: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def predict_files(url: str, model: str, paths: list[str], api_key: Optional[str] = None,
                  timeout: float = 60.0) -> dict[str, Any]:
    """POST image files to /v1/models/{model}/images; returns the parsed JSON response (raises on HTTP errors)."""
    files = [("files", (Path(p).name, Path(p).read_bytes(), mimetypes.guess_type(p)[0] or "application/octet-stream"))
             for p in paths]
    r = httpx.post(f"{url.rstrip('/')}/v1/models/{model}/images", files=files, headers=_headers(api_key),
                   timeout=timeout)
    return _checked(r)


def predict_instances(url: str, model: str, instances: Any, api_key: Optional[str] = None,
                      timeout: float = 60.0) -> dict[str, Any]:
    """POST {"instances": [...]} to /v1/models/{model}:predict."""
    r = httpx.post(f"{url.rstrip('/')}/v1/models/{model}:predict", json={"instances": instances},
                   headers=_headers(api_key), timeout=timeout)
    return _checked(r)


def info(url: str, model: str, api_key: Optional[str] = None) -> dict[str, Any]:
    return _checked(httpx.get(f"{url.rstrip('/')}/v1/models/{model}", headers=_headers(api_key), timeout=30.0))


class ClientError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _checked(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        body = {"error": r.text}
    if r.status_code != 200:
        raise ClientError(r.status_code, body.get("error", str(body)) if isinstance(body, dict) else str(body))
    return body


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Classify images with a transfuse Serve endpoint.")
    ap.add_argument("files", nargs="*", help="image files (JPEG, PNG, WebP, BMP, GIF, TIFF; any size)")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="transfuse", help="model name in /v1/models/{name}")
    ap.add_argument("--instances", help="JSON file: {\"instances\": [...]} or a list of images")
    ap.add_argument("--top", type=int, default=3, help="classes printed per image")
    ap.add_argument("--info", action="store_true", help="print the model's metadata")
    ap.add_argument("--api-key", default=os.environ.get("TRANSFUSE_API_KEY"))
    args = ap.parse_args(argv)
    if not (args.files or args.instances or args.info):
        ap.error("give image files, --instances FILE or --info")
    try:
        if args.info:
            print(json.dumps(info(args.url, args.model, args.api_key), indent=2))
            return 0
        if args.instances:
            doc = json.loads(Path(args.instances).read_text())
            instances = doc["instances"] if isinstance(doc, dict) and "instances" in doc else doc
            resp = predict_instances(args.url, args.model, instances, args.api_key)
            names = [f"instance {i}" for i in range(len(resp["predictions"]))]
        else:
            resp = predict_files(args.url, args.model, args.files, args.api_key)
            names = [p.get("filename") or f for p, f in zip(resp["predictions"], args.files)]
        meta_names = info(args.url, args.model, args.api_key)["class_names"]
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, httpx.HTTPError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"model {resp['model']} version {resp['model_version']}")
    for name, pred in zip(names, resp["predictions"]):
        probs = pred["probabilities"]
        order = sorted(range(len(probs)), key=lambda i: -probs[i])[:args.top]
        tops = ", ".join(f"{meta_names[i]} {probs[i]:.3f}" for i in order)
        print(f"{name}: {tops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
