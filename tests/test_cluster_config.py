"""cluster.yaml (and the KubeRay manifests) checked offline, the way `ray up` would check them, plus what
transfuse relies on (GPU workers with GPUs, a CPU head, the project installed on every node, token auth, S3).

Fast unit tier: no Ray cluster, no network, no AWS. Each check is also run on broken copies, so a check that
could never fail would show up here.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
CIFAR_CONFIG = ROOT / "configs" / "cifar10_vgg16.yaml"
RAY_SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# Instance families with accelerators (g4dn, g5, p3, p4d, inf2, trn1, dl1, ...).
GPU_FAMILY = re.compile(r"^(g|p|inf|trn|dl)\d")


# ---------------------------------------------------------------------------------------------------------
# helpers


def load_cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_schema() -> dict[str, Any]:
    return json.loads(RAY_SCHEMA_PATH.read_text())


def ray_up_validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before it calls the cloud (ray.autoscaler._private.commands._bootstrap_config):
    the raw file against Ray's JSON schema, then defaults merged (prepare_config) and validate_config (the
    schema again plus head type / min-max cross-checks). Returns the prepared config."""
    jsonschema.validate(cfg, ray_schema())
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def docker_env(cfg: dict[str, Any]) -> dict[str, str]:
    """Environment variables set for the whole container through `docker.run_options` (`-e NAME=value`)."""
    env: dict[str, str] = {}
    for opt in cfg.get("docker", {}).get("run_options", []):
        m = re.fullmatch(r"(?:-e|--env)[ =](\w+)=(\S+)", opt.strip())
        if m:
            env[m.group(1)] = m.group(2)
    return env


def node_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return cfg.get("available_node_types", {})


def gpu_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in node_types(cfg).items() if v.get("resources", {}).get("GPU", 0) >= 1}


def transfuse_problems(cfg: dict[str, Any]) -> list[str]:
    """What transfuse needs from a cluster config beyond Ray's schema; an empty list when all is there."""
    problems: list[str] = []
    types = node_types(cfg)
    head_name = cfg.get("head_node_type")
    head = types.get(head_name, {})

    # A CPU head that coordinates: no GPUs, a CPU instance type, its CPU count declared.
    if head.get("resources", {}).get("GPU", 0):
        problems.append(f"head type {head_name!r} declares GPUs: {head['resources']}")
    head_instance = head.get("node_config", {}).get("InstanceType", "")
    if GPU_FAMILY.match(head_instance):
        problems.append(f"head type {head_name!r} is a GPU instance ({head_instance}); want a CPU type")
    if "CPU" not in head.get("resources", {}):
        problems.append(f"head type {head_name!r} does not declare its CPU resource")

    workers = {k: v for k, v in types.items() if k != head_name}
    gpus = {k: v for k, v in gpu_types(cfg).items() if k != head_name}
    cpus = {k: v for k, v in workers.items() if k not in gpus}
    if not gpus:
        problems.append("no worker type declares GPU >= 1 (Ray Train needs one)")
    if not cpus:
        problems.append("no CPU-only worker type (Ray Data needs one)")
    for name, t in workers.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        if hi is None:
            problems.append(f"worker type {name!r} has no max_workers")
        elif hi < max(lo, 1):
            problems.append(f"worker type {name!r}: max_workers {hi} must be >= min_workers {lo} and >= 1")
        if t.get("resources", {}).get("CPU", 0) < 1:
            problems.append(f"worker type {name!r} declares no CPUs: {t.get('resources')}")
        instance = t.get("node_config", {}).get("InstanceType", "")
        if name in gpus and not GPU_FAMILY.match(instance):
            problems.append(f"worker type {name!r} declares GPUs but {instance!r} is not a GPU instance")
    total_max = sum(t.get("max_workers", 0) for t in workers.values())
    if cfg.get("max_workers", 0) < total_max:
        problems.append(f"max_workers {cfg.get('max_workers')} caps the types' own maxima (sum {total_max})")

    # Ray's own image at the Ray version developed and tested here (ray-ml is no longer published).
    image = cfg.get("docker", {}).get("image", "")
    if not image.startswith("rayproject/ray:") or not image.split(":")[1].startswith(ray.__version__ + "-"):
        problems.append(f"docker.image {image!r} is not rayproject/ray:{ray.__version__}-...")
    if "-gpu" not in image:
        problems.append(f"docker.image {image!r} is not a -gpu image")

    # setup_commands install this project (the working tree mounted from ".") with its GPU TensorFlow.
    mounts = cfg.get("file_mounts", {})
    project_dirs = [remote for remote, local in mounts.items() if os.path.normpath(local) == "."]
    if not project_dirs:
        problems.append("file_mounts does not mount the working tree ('.')")
    setup = " ".join(cfg.get("setup_commands", []))
    installs = [d for d in project_dirs if re.search(rf"pip install\b.*{re.escape(d)}", setup)]
    if not installs:
        problems.append(f"setup_commands do not pip install the mounted project {project_dirs}: {setup!r}")
    if installs and f"{installs[0]}[gpu]" in setup:
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        if not any(dep.startswith("tensorflow[and-cuda]") for dep in extras.get("gpu", [])):
            problems.append("pyproject's [gpu] extra does not pull tensorflow[and-cuda]")
    elif "tensorflow[and-cuda]" not in setup:
        problems.append("setup_commands install neither the project's [gpu] extra nor tensorflow[and-cuda]")
    if f"=={ray.__version__}" not in setup:
        problems.append(f"setup_commands do not pin Ray to the image's version {ray.__version__}")

    # Token authentication on every node, with the token file shipped by file_mounts.
    env = docker_env(cfg)
    if env.get("RAY_AUTH_MODE") != "token":
        problems.append("RAY_AUTH_MODE=token is not set for the container (docker.run_options)")
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    if token_path and token_path not in mounts:
        problems.append(f"RAY_AUTH_TOKEN_PATH {token_path} is not a file_mounts destination")

    # Outputs on object storage.
    if not env.get("TRANSFUSE_STORAGE", "").startswith("s3://"):
        problems.append("TRANSFUSE_STORAGE (docker.run_options) is not an s3:// URI")
    return problems


# ---------------------------------------------------------------------------------------------------------
# cluster.yaml against Ray's schema


def test_ray_schema_is_the_installed_one():
    schema = ray_schema()
    assert schema["additionalProperties"] is False  # unknown top-level keys are errors: the test relies on it
    assert "available_node_types" in schema["properties"]


def test_cluster_yaml_passes_ray_validation():
    prepared = ray_up_validate(load_cluster())
    # prepare_config merged the AWS defaults and filled per-type maxima: the head launches no workers.
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        *parents, last = path.split("/")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value

    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        *parents, last = path.split("/")
        node = cfg
        for p in parents:
            node = node[p]
        del node[last]

    return mutate


RAY_BROKEN = [
    # (id, mutation, exception, message pattern)
    ("unknown top-level key", _set("max_worker", 12), jsonschema.ValidationError,
     r"Additional properties are not allowed \('max_worker'"),
    ("max_workers not an int", _set("max_workers", "twelve"), jsonschema.ValidationError,
     r"'twelve' is not of type 'integer'"),
    ("GPU count a string", _set("available_node_types/worker.gpu/resources/GPU", "4"),
     jsonschema.ValidationError, r"'4' is not of type 'integer'"),
    ("node type without resources", _delete("available_node_types/worker.cpu/resources"),
     jsonschema.ValidationError, r"'resources' is a required property"),
    ("misspelt node type key", _set("available_node_types/worker.gpu/min_worker", 0),
     jsonschema.ValidationError, r"Additional properties are not allowed \('min_worker'"),
    ("unknown docker key", _set("docker/imag", "rayproject/ray:latest"), jsonschema.ValidationError,
     r"Additional properties are not allowed \('imag'"),
    ("head type not defined", _set("head_node_type", "head.gpu"), ValueError,
     r"`head_node_type` must be one of `available_node_types`"),
    ("global max below min_workers", _set("max_workers", 0), ValueError,
     r"smaller than the sum of `min_workers`"),
]


@pytest.mark.parametrize("mutate, exc, pattern", [r[1:] for r in RAY_BROKEN], ids=[r[0] for r in RAY_BROKEN])
def test_broken_cluster_yaml_fails_ray_validation(mutate, exc, pattern):
    cfg = load_cluster()
    mutate(cfg)
    with pytest.raises(exc, match=pattern):
        ray_up_validate(cfg)


# ---------------------------------------------------------------------------------------------------------
# cluster.yaml: what transfuse relies on


def test_cluster_yaml_meets_transfuse_needs():
    cfg = load_cluster()
    assert transfuse_problems(cfg) == []
    (gpu,) = gpu_types(cfg).values()
    assert gpu["resources"]["GPU"] == 4  # several GPUs per node for Ray Train
    assert gpu["min_workers"] == 0  # scales from zero: GPUs only while a stage needs them
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"]["CPU"] == 0
    assert cfg["idle_timeout_minutes"] > 0


TRANSFUSE_BROKEN = [
    ("GPU worker with 0 GPUs", _set("available_node_types/worker.gpu/resources/GPU", 0), r"GPU >= 1"),
    ("max below min", _set("available_node_types/worker.cpu/max_workers", 0), r"max_workers 0 must be >="),
    ("GPU head", _set("available_node_types/head.cpu/node_config/InstanceType", "g5.xlarge"),
     r"head type 'head.cpu' is a GPU instance"),
    ("no project install", _set("setup_commands", ["pip install tensorflow"]), r"do not pip install"),
    ("no CUDA TensorFlow", _set("setup_commands", ['pip install -e /home/ray/transfuse "ray==2.60.0"']),
     r"tensorflow\[and-cuda\]"),
    ("ray-ml image", _set("docker/image", "rayproject/ray-ml:2.60.0-py311-gpu"), r"is not rayproject/ray:"),
    ("auth off", _set("docker/run_options", ["-e RAY_AUTH_MODE=disabled"]), r"RAY_AUTH_MODE=token"),
    ("no working tree mount", _set("file_mounts", {}), r"does not mount the working tree"),
]


@pytest.mark.parametrize("mutate, pattern", [r[1:] for r in TRANSFUSE_BROKEN], ids=[r[0] for r in TRANSFUSE_BROKEN])
def test_broken_cluster_yaml_fails_transfuse_checks(mutate, pattern):
    cfg = load_cluster()
    mutate(cfg)
    problems = transfuse_problems(cfg)
    assert any(re.search(pattern, p) for p in problems), problems


def test_container_gets_the_token_and_the_project():
    """The `docker run` line Ray builds for a node (ray.autoscaler._private.docker.docker_start_cmds, with the
    image's HOME) bind-mounts the token file where RAY_AUTH_TOKEN_PATH points and the working tree where
    setup_commands install it, and sets token mode for every process in the container."""
    from ray.autoscaler._private.docker import docker_start_cmds

    cfg = load_cluster()
    docker = cfg["docker"]
    cmd = docker_start_cmds("ubuntu", docker["image"], cfg["file_mounts"], docker["container_name"],
                            docker["run_options"], cfg["cluster_name"], "/home/ray", "docker")
    env = docker_env(cfg)
    assert "-e RAY_AUTH_MODE=token" in cmd
    assert re.search(rf"-v \S+:{re.escape(env['RAY_AUTH_TOKEN_PATH'])}(\s|$)", cmd), cmd
    assert re.search(r"-v \S+:/home/ray/transfuse(\s|$)", cmd), cmd
    assert cmd.rstrip().endswith(f"{docker['image']} bash")


def ec2_launch_problems(cfg: dict[str, Any]) -> list[str]:
    """Each node type's node_config against EC2's RunInstances request model, from botocore's bundled API
    description (offline): Ray passes node_config to RunInstances as it stands, so a misspelt or mistyped
    field would only fail at launch time."""
    from botocore.session import get_session
    from botocore.validate import ParamValidator

    shape = get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    problems = []
    for name, t in node_types(cfg).items():
        # MinCount/MaxCount: Ray adds them at launch.
        report = ParamValidator().validate(dict(t["node_config"], MinCount=1, MaxCount=1), shape)
        if report.has_errors():
            problems.append(f"{name}: {report.generate_report()}")
    return problems


def test_node_configs_are_valid_ec2_launch_requests():
    pytest.importorskip("botocore", reason="botocore (boto3, which `ray up` on AWS needs) not installed")
    cfg = load_cluster()
    assert ec2_launch_problems(cfg) == []
    cfg["available_node_types"]["worker.gpu"]["node_config"]["InstanceTyp"] = "g5.12xlarge"
    cfg["available_node_types"]["worker.cpu"]["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] = "200"
    problems = "\n".join(ec2_launch_problems(cfg))
    assert 'Unknown parameter in input: "InstanceTyp"' in problems
    assert "Invalid type for parameter BlockDeviceMappings[0].Ebs.VolumeSize" in problems


def test_cluster_matches_the_cifar10_run_config():
    """The cluster named in configs/cifar10_vgg16.yaml can hold what that config asks for."""
    if not CIFAR_CONFIG.is_file():
        pytest.skip("configs/cifar10_vgg16.yaml not present")
    run = yaml.safe_load(CIFAR_CONFIG.read_text())
    cfg = load_cluster()
    assert docker_env(cfg)["TRANSFUSE_STORAGE"] == run["storage"], "cluster and run config name other storage"

    train = run.get("train", {})
    if not train.get("use_gpu"):
        pytest.skip("the cifar10 config does not train on GPUs")
    (gpu,) = gpu_types(cfg).values()
    per_node_gpus = gpu["resources"]["GPU"]
    gpus_per_worker = train.get("gpus_per_worker", 1)
    workers_per_node = per_node_gpus // gpus_per_worker
    # Every Train worker's CPUs fit beside its GPU on a node, so workers pack 4 to a node.
    assert workers_per_node * train.get("cpus_per_worker", 1) <= gpu["resources"]["CPU"]
    # One training run fits within the GPU type's maximum, and so do the concurrent Tune trials.
    nodes_per_run = -(-train.get("num_workers", 1) // workers_per_node)
    concurrent = run.get("tune", {}).get("max_concurrent", 1)
    assert nodes_per_run * concurrent <= gpu["max_workers"], (nodes_per_run, concurrent, gpu["max_workers"])


# ---------------------------------------------------------------------------------------------------------
# KubeRay manifests (deploy/kuberay/). KubeRay's CRD schemas are not available offline, so the structure is
# checked against the subset of the ray.io/v1 API these manifests use (field names and types from KubeRay's
# RayClusterSpec / RayJobSpec / RayServiceSpec), stricter than the CRD in one way: unknown keys are errors
# here, where the API server would drop them silently. What Ray itself reads (the Serve config, the runtime
# env) is validated with Ray's own schemas.

KUBERAY_DIR = ROOT / "deploy" / "kuberay"
RAYJOB_YAML = KUBERAY_DIR / "rayjob.yaml"
RAYSERVICE_YAML = KUBERAY_DIR / "rayservice.yaml"
IMAGE_CODE_DIR = "/home/ray/transfuse"  # where the images hold this repository

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"type": ["string", "integer", "number"]}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"],
                                             "properties": {"containerPort": {"type": "integer"}}}},
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "requests": {"type": "object", "additionalProperties": _QUANTITY},
                "limits": {"type": "object", "additionalProperties": _QUANTITY},
            },
        },
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}},
        },
    },
}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "authOptions": {"type": "object", "additionalProperties": False,
                        "properties": {"mode": {"enum": ["token", "disabled"]}}},
        "autoscalerOptions": {
            "type": "object",
            "properties": {
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            },
        },
        "headGroupSpec": {
            "type": "object",
            "required": ["template"],
            "additionalProperties": False,
            "properties": {
                "rayStartParams": _STR_MAP,
                "serviceType": {"type": "string"},
                "template": _POD_TEMPLATE,
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["groupName", "minReplicas", "maxReplicas", "template"],
                "additionalProperties": False,
                "properties": {
                    "groupName": {"type": "string", "minLength": 1},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                    "rayStartParams": _STR_MAP,
                    "template": _POD_TEMPLATE,
                },
            },
        },
    },
}


def _resource_schema(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            "spec": spec,
        },
    }


RAYJOB_SCHEMA = _resource_schema("RayJob", {
    "type": "object",
    "required": ["entrypoint", "rayClusterSpec"],
    "additionalProperties": False,
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "runtimeEnvYAML": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "rayClusterSpec": _CLUSTER_SPEC,
    },
})
RAYSERVICE_SCHEMA = _resource_schema("RayService", {
    "type": "object",
    "required": ["serveConfigV2", "rayClusterConfig"],
    "additionalProperties": False,
    "properties": {
        "serveConfigV2": {"type": "string", "minLength": 1},
        "rayClusterConfig": _CLUSTER_SPEC,
    },
})


def load_manifest(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path} should hold one resource, holds {len(docs)}"
    return docs[0]


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cs = cluster_spec(manifest)
    groups = [cs["headGroupSpec"], *cs.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def serve_config(manifest: dict[str, Any]):
    """serveConfigV2 through Ray Serve's own schema (what `serve deploy` and KubeRay's Serve client send)."""
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))


def runtime_env(manifest: dict[str, Any]):
    """runtimeEnvYAML through Ray's RuntimeEnv validation. Its working_dir is the repository inside the
    image; here the repository itself stands in for it (RuntimeEnv checks that a local path exists)."""
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(manifest["spec"].get("runtimeEnvYAML") or "{}")
    if env.get("working_dir") == IMAGE_CODE_DIR:
        env["working_dir"] = str(ROOT)
    return RuntimeEnv(**env)


def kuberay_problems(manifest: dict[str, Any]) -> list[str]:
    """What transfuse needs from either manifest beyond its structure."""
    problems: list[str] = []
    cs = cluster_spec(manifest)
    if cs.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {cs.get('rayVersion')!r} is not the Ray tested here ({ray.__version__})")
    for c in containers(manifest):
        if f"ray{ray.__version__}-" not in c["image"] and not c["image"].startswith(f"rayproject/ray:{ray.__version__}-"):
            problems.append(f"container {c['name']} image {c['image']!r} is not built on Ray {ray.__version__}")
    if cs.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode is not token")
    if cs["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("the head offers CPUs to tasks (rayStartParams num-cpus should be '0')")
    for g in cs.get("workerGroupSpecs", []):
        lo, hi, n = g["minReplicas"], g["maxReplicas"], g.get("replicas", g["minReplicas"])
        if not lo <= n <= hi or hi < 1:
            problems.append(f"group {g['groupName']}: want minReplicas {lo} <= replicas {n} <= maxReplicas {hi}, max >= 1")
    if not cs.get("enableInTreeAutoscaling"):
        problems.append("enableInTreeAutoscaling is off")
    return problems


def _gpus(group: dict[str, Any]) -> int:
    return max(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in group["template"]["spec"]["containers"])


def test_rayjob_structure_and_needs():
    job = load_manifest(RAYJOB_YAML)
    jsonschema.validate(job, RAYJOB_SCHEMA)
    assert kuberay_problems(job) == []
    assert job["spec"]["entrypoint"] == "python -m jobs.pipeline --config configs/cifar10_vgg16.yaml"
    env = runtime_env(job)
    assert env.env_vars()["TF_USE_LEGACY_KERAS"] == "1"
    groups = {g["groupName"]: g for g in cluster_spec(job)["workerGroupSpecs"]}
    assert _gpus(groups["gpu"]) == 4 and groups["gpu"]["minReplicas"] == 0
    assert _gpus(groups["cpu"]) == 0
    # The same storage as the launcher config.
    storages = {e["value"] for c in containers(job) for e in c.get("env", []) if e["name"] == "TRANSFUSE_STORAGE"}
    assert storages == {docker_env(load_cluster())["TRANSFUSE_STORAGE"]}


def test_rayjob_entrypoint_exists():
    if not CIFAR_CONFIG.is_file() or not (ROOT / "jobs" / "pipeline.py").is_file():
        pytest.skip("jobs/pipeline.py or configs/cifar10_vgg16.yaml not written yet")
    entry = load_manifest(RAYJOB_YAML)["spec"]["entrypoint"].split()
    assert (ROOT / entry[entry.index("--config") + 1]).is_file()
    assert (ROOT / (entry[entry.index("-m") + 1].replace(".", "/") + ".py")).is_file()


def test_rayservice_structure_and_needs():
    svc = load_manifest(RAYSERVICE_YAML)
    jsonschema.validate(svc, RAYSERVICE_SCHEMA)
    assert kuberay_problems(svc) == []
    (app,) = serve_config(svc).applications
    assert app.import_path == "serve.app:build_app"
    assert all(_gpus(g) == 0 for g in cluster_spec(svc)["workerGroupSpecs"])  # serving runs on CPUs
    if CIFAR_CONFIG.is_file():
        run = yaml.safe_load(CIFAR_CONFIG.read_text())
        assert app.args["bundle"].startswith(f"{run['storage']}/{run['run']}/"), app.args


def test_rayservice_app_and_args_match_the_serve_app(monkeypatch):
    """The import path names the real builder, and its args pass the builder's own argument model."""
    if not (ROOT / "serve" / "app.py").is_file():
        pytest.skip("serve/app.py not written yet")
    import importlib

    (app,) = serve_config(load_manifest(RAYSERVICE_YAML)).applications
    module_name, _, attr = app.import_path.partition(":")
    monkeypatch.syspath_prepend(str(ROOT))
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr))
    if hasattr(module, "AppArgs"):
        args = module.AppArgs.model_validate(app.args)
        if CIFAR_CONFIG.is_file():
            serve_section = yaml.safe_load(CIFAR_CONFIG.read_text()).get("serve", {})
            for key in ("name", "min_replicas", "max_replicas", "max_batch_size"):
                if key in serve_section:
                    assert getattr(args, key) == serve_section[key], key


def test_every_cluster_starts_serve_with_the_cifar10_configs_ingress():
    """Serve's ingress is fixed when a node starts (its environment), so every cluster definition that runs the
    cifar10 config's deploy (the launcher's containers, the RayJob's and the RayService's pods) must start its
    nodes with the ingress that config names: else jobs.deploy refuses the config."""
    from transfuse.config import load_config
    from transfuse.environment import serve_ingress

    want = load_config(CIFAR_CONFIG).serve.ingress
    assert want == "haproxy"
    envs = {"cluster.yaml": docker_env(load_cluster())}
    for path in (RAYJOB_YAML, RAYSERVICE_YAML):
        for c in containers(load_manifest(path)):
            envs[f"{path.name}:{c['name']}"] = {e["name"]: e["value"] for e in c.get("env", [])}
    assert {name: serve_ingress(env) for name, env in envs.items()} == {name: want for name in envs}


KUBERAY_BROKEN = [
    # (id, file, mutation, exception, message pattern)
    ("wrong apiVersion", RAYJOB_YAML, _set("apiVersion", "ray.io/v1alpha1"), jsonschema.ValidationError,
     r"'ray.io/v1' was expected"),
    ("wrong kind", RAYSERVICE_YAML, _set("kind", "RayCluster"), jsonschema.ValidationError,
     r"'RayService' was expected"),
    ("no entrypoint", RAYJOB_YAML, _delete("spec/entrypoint"), jsonschema.ValidationError,
     r"'entrypoint' is a required property"),
    ("misspelt spec key", RAYJOB_YAML, _set("spec/shutdownAfterJobFinish", True), jsonschema.ValidationError,
     r"Additional properties are not allowed \('shutdownAfterJobFinish'"),
    ("rayStartParams value not a string", RAYJOB_YAML,
     _set("spec/rayClusterSpec/headGroupSpec/rayStartParams/num-cpus", 0), jsonschema.ValidationError,
     r"0 is not of type 'string'"),
    ("replicas a string", RAYSERVICE_YAML, lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
     .__setitem__("maxReplicas", "6"), jsonschema.ValidationError, r"'6' is not of type 'integer'"),
    ("no containers", RAYJOB_YAML, _set("spec/rayClusterSpec/headGroupSpec/template/spec/containers", []),
     jsonschema.ValidationError, r"should be non-empty|is too short"),
]


@pytest.mark.parametrize("path, mutate, exc, pattern", [r[1:] for r in KUBERAY_BROKEN],
                         ids=[r[0] for r in KUBERAY_BROKEN])
def test_broken_kuberay_manifest_fails_validation(path, mutate, exc, pattern):
    manifest = load_manifest(path)
    mutate(manifest)
    schema = RAYJOB_SCHEMA if path == RAYJOB_YAML else RAYSERVICE_SCHEMA
    with pytest.raises(exc, match=pattern):
        jsonschema.validate(manifest, schema)


def test_broken_serve_config_and_runtime_env_fail_ray_validation():
    from pydantic import ValidationError

    svc = load_manifest(RAYSERVICE_YAML)
    svc["spec"]["serveConfigV2"] = svc["spec"]["serveConfigV2"].replace("serve.app:build_app", "serve_app")
    with pytest.raises(ValidationError, match=r"invalid import path"):
        serve_config(svc)

    job = load_manifest(RAYJOB_YAML)
    job["spec"]["runtimeEnvYAML"] = "env_vars:\n  TF_USE_LEGACY_KERAS: 1\n"  # an int, not a string
    with pytest.raises(TypeError, match=r"env_vars"):
        runtime_env(job)


KUBERAY_NEEDS_BROKEN = [
    ("other Ray version", _set("spec/rayClusterSpec/rayVersion", "2.9.0"), r"rayVersion '2.9.0'"),
    ("ray-ml image", lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .__setitem__("image", "rayproject/ray-ml:2.9.0-gpu"), r"is not built on Ray"),
    ("auth off", _set("spec/rayClusterSpec/authOptions/mode", "disabled"), r"authOptions.mode is not token"),
    ("head offers CPUs", _set("spec/rayClusterSpec/headGroupSpec/rayStartParams/num-cpus", "8"), r"num-cpus"),
    ("replicas above max", lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", 9),
     r"replicas 9 <= maxReplicas 8"),
]


@pytest.mark.parametrize("mutate, pattern", [r[1:] for r in KUBERAY_NEEDS_BROKEN],
                         ids=[r[0] for r in KUBERAY_NEEDS_BROKEN])
def test_broken_rayjob_fails_transfuse_checks(mutate, pattern):
    job = load_manifest(RAYJOB_YAML)
    mutate(job)
    problems = kuberay_problems(job)
    assert any(re.search(pattern, p) for p in problems), problems


def test_a_job_that_sets_the_workers_env_itself_keeps_it(monkeypatch):
    """The RayJob's runtime env sets TF_USE_LEGACY_KERAS, and so does transfuse's ray.init: Ray refuses to merge
    the same key twice, so inside such a job transfuse leaves the keys the job sets (Ray hands the job's config
    to its driver in RAY_JOB_CONFIG_JSON_ENV_VAR) and adds the rest."""
    from transfuse import environment

    assert environment.runtime_env()["env_vars"] == environment.WORKER_ENV  # no job: all of them
    job_env = runtime_env(load_manifest(RAYJOB_YAML)).env_vars()
    # the shape Ray's job supervisor gives the entrypoint (ray.dashboard.modules.job.job_supervisor)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": job_env},
                                                                  "metadata": {}}))
    ours = environment.runtime_env()["env_vars"]
    assert "TF_USE_LEGACY_KERAS" in job_env and not ours.keys() & job_env.keys()
    assert ours == {k: v for k, v in environment.WORKER_ENV.items() if k not in job_env}
