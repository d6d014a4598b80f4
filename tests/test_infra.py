"""infra/: manifests parse, validate against the real KubeRay CRDs, name entrypoints that exist,
hold no credentials, and agree with each other, the Dockerfile and pyproject.toml.

Run: python -m pytest tests/test_infra.py -q

The CRDs are read from ../shared/kuberay-crds/ (next to the project); the CRD tests are skipped
with a reason when that folder is absent.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from jobs.cli import build_parser
from jobs.submit import looks_secret
from pipeline.config import ModelConfig, load_job

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
YAML_FILES = sorted(INFRA.rglob("*.yaml"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR} (../shared/kuberay-crds)"
)


# --- helpers ----------------------------------------------------------------------------------


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def kube_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in docs(p)]


def one(kind: str) -> dict[str, Any]:
    found = [d for _, d in kube_docs() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in infra/kuberay, found {len(found)}"
    return found[0]


def cluster_specs() -> dict[str, dict[str, Any]]:
    return {
        "RayCluster": one("RayCluster")["spec"],
        "RayJob": one("RayJob")["spec"]["rayClusterSpec"],
        "RayCronJob": one("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def pod_templates(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    groups = {"head": spec["headGroupSpec"]}
    groups |= {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}
    return groups


def quantity(value: str | int) -> float:
    """Kubernetes quantity ("5Gi", "500m", "4000000000") in base units."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert m, f"not a quantity: {value!r}"
    number, unit = float(m.group(1)), m.group(2)
    return number / 1000 if unit == "m" else number * units.get(unit, 1)


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text(encoding="utf-8")


def docker_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", dockerfile(), re.MULTILINE)
    assert m, f"infra/Dockerfile does not set ARG {name}"
    return m.group(1)


def pyproject_requirement(name: str) -> Requirement:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    return next(r for r in reqs if r.name == name)


# Credential shapes: AWS access key ids, PEM private keys, GitHub/Slack tokens, and 40-char
# base64 runs mixing cases and digits (AWS secret keys).
_SECRET_VALUE = re.compile(
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|-----BEGIN [A-Z ]*PRIVATE KEY|\bgh[pousr]_[A-Za-z0-9]{20,}"
    r"|\bxox[abpr]-[A-Za-z0-9-]{10,}|\.aws/credentials"
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_B64_40 = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def _secret_string(s: str) -> bool:
    if _SECRET_VALUE.search(s):
        return True
    return any(
        re.search(r"[a-z]", m) and re.search(r"[A-Z]", m) and re.search(r"[0-9]", m)
        for m in _B64_40.findall(s)
    )


def find_secrets(node: Any, where: str = "") -> list[str]:
    """Places in a parsed YAML/JSON tree that hold a credential value rather than a reference."""
    found: list[str] = []
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and looks_secret(name) and node.get("value") not in (None, ""):
            found.append(f"{where}: {name} has a literal value")  # env var: use valueFrom
        for k, v in node.items():
            if k in ("valueFrom", "secretKeyRef", "secretRef"):
                continue  # a reference to a Secret: names, not values
            key = str(k)
            if (
                key != "key"
                and _IDENT.fullmatch(key)
                and looks_secret(key)
                and isinstance(v, str)
                and v.strip()
            ):
                found.append(f"{where}.{k}: literal value")
            found += find_secrets(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += find_secrets(v, f"{where}[{i}]")
    elif isinstance(node, str) and _secret_string(node):
        found.append(f"{where}: looks like a credential")
    return found


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields made errors: Kubernetes silently prunes them, so a
    misspelt field would otherwise pass validation and vanish on `kubectl apply`."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if k != "properties"}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        preserve = schema.get("x-kubernetes-preserve-unknown-fields")
        if "additionalProperties" not in schema and not preserve:
            out["additionalProperties"] = False
    return out


@functools.cache
def crds() -> list[dict[str, Any]]:
    """The CRD files, parsed once (each is 13-25k lines)."""
    return [
        yaml.load(p.read_text(encoding="utf-8"), Loader=_LOADER)
        for p in sorted(CRD_DIR.glob("*.yaml"))
    ]


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    group, version = api_version.split("/")
    for crd in crds():
        if crd["spec"]["group"] != group or crd["spec"]["names"]["kind"] != kind:
            continue
        for v in crd["spec"]["versions"]:
            if v["name"] == version:
                assert v.get("served"), f"{kind} {version} is not served by this CRD"
                return jsonschema.Draft7Validator(strict(v["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"no CRD in {CRD_DIR} for {api_version} {kind}")


def errors(validator: jsonschema.Draft7Validator, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


# --- parse and validate -----------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert docs(path), f"{path} holds no YAML document"


def test_the_expected_files_exist() -> None:
    for rel in (
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/raycronjob.yaml",
        "kuberay/serviceaccount.yaml",
        "kuberay/networkpolicy.yaml",
        "cluster-launcher.yaml",
        "Dockerfile",
        "README.md",
    ):
        assert (INFRA / rel).is_file(), f"infra/{rel} is missing"


@needs_crds
@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayCronJob"])
def test_kuberay_manifest_validates_against_its_crd(kind: str) -> None:
    doc = one(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert errors(crd_validator(doc["apiVersion"], kind), doc) == []


@needs_crds
def test_crd_validation_catches_mistakes() -> None:
    """The check above can fail: a misspelt field, a wrong type, a missing required field."""
    doc = one("RayCluster")
    validator = crd_validator(doc["apiVersion"], "RayCluster")
    typo = copy.deepcopy(doc)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 0
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    missing = copy.deepcopy(doc)
    del missing["spec"]["workerGroupSpecs"][1]["maxReplicas"]
    for bad in (typo, wrong_type, missing):
        assert errors(validator, bad), "validator accepted a broken manifest"


def test_manifests_pass_the_operators_own_checks() -> None:
    """Rules KubeRay's controller enforces beyond the CRD schema (utils/validation.go)."""
    dns1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
    limits = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 47}  # cluster names get a suffix
    for kind, limit in limits.items():
        name = one(kind)["metadata"]["name"]
        assert dns1035.fullmatch(name) and len(name) <= limit, f"{kind} name {name!r}"
    for kind, spec in cluster_specs().items():
        if spec.get("authOptions", {}).get("mode") == "token":
            assert Version(spec["rayVersion"]) >= Version("2.52.0"), kind
        for group, g in pod_templates(spec).items():
            # num-cpus etc. in rayStartParams and the group's `resources` field exclude each other.
            assert not (g.get("resources") and g["rayStartParams"]), f"{kind}/{group}"
            # Autoscaler v2 needs restartPolicy Never or unset.
            assert g["template"]["spec"].get("restartPolicy", "Never") == "Never", f"{kind}/{group}"


def test_cluster_launcher_validates_against_rays_schema() -> None:
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    (config,) = docs(INFRA / "cluster-launcher.yaml")
    jsonschema.validate(config, schema)
    assert set(config["available_node_types"]) == {"head", "cpu", "gpu"}


# --- entrypoints ------------------------------------------------------------------------------


def entrypoints() -> dict[str, str]:
    return {
        "RayJob": one("RayJob")["spec"]["entrypoint"],
        "RayCronJob": one("RayCronJob")["spec"]["jobTemplate"]["entrypoint"],
    }


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob"])
def test_entrypoint_runs_an_existing_valid_job_file_through_ziya_batch_run(kind: str) -> None:
    argv = shlex.split(entrypoints()[kind])
    assert argv[:3] == ["python", "-m", "jobs.cli"], f"{kind}: entrypoint is not jobs.cli"
    args = build_parser().parse_args(argv[3:])  # the real `ziya-batch` parser
    assert args.command == "run"
    job_path = ROOT / args.job
    assert job_path.is_file(), f"{kind} names {args.job}, which is not in the project"
    load_job(job_path, args.overrides)


def test_entrypoints_are_the_documented_jobs() -> None:
    eps = entrypoints()
    assert "jobs/caption_dataset.yaml" in eps["RayJob"]
    assert "jobs/nightly_labeling.yaml" in eps["RayCronJob"]
    assert load_job(ROOT / "jobs/nightly_labeling.yaml").run.mode == "incremental"


def test_job_files_run_from_the_image_workdir() -> None:
    """Relative job paths resolve in the image's WORKDIR, where the Dockerfile copies jobs/."""
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile(), re.MULTILINE).group(1)
    assert re.search(r"^COPY .*\bjobs \./jobs$", dockerfile(), re.MULTILINE)
    for kind, spec in cluster_specs().items():
        for group, g in pod_templates(spec).items():
            for c in g["template"]["spec"]["containers"]:
                assert c.get("workingDir") == workdir, f"{kind}/{group}: workingDir != {workdir}"


# --- the cluster spec ---------------------------------------------------------------------------


def test_rayjob_and_raycronjob_use_the_raycluster_spec() -> None:
    specs = cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"], "rayjob.yaml's cluster spec has drifted"
    assert specs["RayCronJob"] == specs["RayCluster"], "raycronjob.yaml's cluster spec has drifted"


def test_worker_groups_autoscale_cpu_and_gpu() -> None:
    spec = one("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for name, g in groups.items():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1" and gpu["requests"]["nvidia.com/gpu"] == "1"
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"]


def test_gpu_group_fits_the_job_files() -> None:
    """Logical CPUs on GPU workers = cpus_per_actor (preprocessing stays on the cpu group), and
    the autoscaling bound allows every actor of the jobs the manifests run."""
    gpu = {g["groupName"]: g for g in one("RayCluster")["spec"]["workerGroupSpecs"]}["gpu"]
    launcher_gpu = docs(INFRA / "cluster-launcher.yaml")[0]["available_node_types"]["gpu"]
    for ep in entrypoints().values():
        job = load_job(ROOT / shlex.split(ep)[4])
        assert job.resources.gpus_per_actor == 1
        assert float(gpu["rayStartParams"]["num-cpus"]) == job.resources.cpus_per_actor
        assert launcher_gpu["resources"] == {"CPU": job.resources.cpus_per_actor, "GPU": 1}
        assert job.resources.actors <= gpu["maxReplicas"]
        assert job.resources.actors <= launcher_gpu["max_workers"]


def test_shm_holds_the_object_store_and_weights_cache_on_local_disk() -> None:
    for name, g in pod_templates(one("RayCluster")["spec"]).items():
        pod = g["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory", name
        store = quantity(g["rayStartParams"]["object-store-memory"])
        assert quantity(shm["sizeLimit"]) >= store, f"{name}: /dev/shm smaller than the store"
        memory = quantity(pod["containers"][0]["resources"]["limits"]["memory"])
        assert quantity(shm["sizeLimit"]) < memory, f"{name}: /dev/shm above the pod's memory"
    gpu = pod_templates(one("RayCluster")["spec"])["gpu"]["template"]["spec"]
    cache_dir = ModelConfig.model_fields["cache_dir"].default
    mounts = {m["mountPath"]: m["name"] for m in gpu["containers"][0]["volumeMounts"]}
    cache = {v["name"]: v for v in gpu["volumes"]}[mounts[cache_dir]]
    assert "emptyDir" in cache and "medium" not in cache["emptyDir"], "cache must be on disk"


# --- access and credentials -------------------------------------------------------------------


def test_token_auth_and_restricted_access_on_kuberay() -> None:
    spec = one("RayCluster")["spec"]
    assert spec["authOptions"]["mode"] == "token"
    secret = spec["authOptions"]["secretName"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    for name, g in pod_templates(spec).items():
        env = {e["name"]: e for e in g["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret, "key": "auth_token"} and "value" not in env["RAY_AUTH_TOKEN"]
    policy = one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])]
    assert ports == [8265], "outside the cluster's own pods, only the Job API port is opened"
    head_labels = spec["headGroupSpec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert {
        k: v for k, v in selector.items() if k != "ray.io/node-type"
    }.items() <= head_labels.items()


def test_every_pod_runs_as_the_workload_identity_service_account() -> None:
    account = one("ServiceAccount")
    annotations = account["metadata"]["annotations"]
    assert "eks.amazonaws.com/role-arn" in annotations
    assert "iam.gke.io/gcp-service-account" in annotations
    for kind, spec in cluster_specs().items():
        for name, g in pod_templates(spec).items():
            assert g["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"], (
                f"{kind}/{name}"
            )


def test_cluster_launcher_binds_dashboard_to_loopback_with_token_auth() -> None:
    (config,) = docs(INFRA / "cluster-launcher.yaml")
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    for name, node in config["available_node_types"].items():
        assert "IamInstanceProfile" in node["node_config"], f"{name}: no instance profile"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_no_credentials_in_manifests(path: Path) -> None:
    for doc in docs(path):
        assert doc.get("kind") != "Secret", f"{path.name}: Secrets are created by hand, not here"
        assert find_secrets(doc, path.name) == []


def test_no_credentials_in_dockerfile_or_readme() -> None:
    for name in ("Dockerfile", "README.md", "Dockerfile.dockerignore"):
        text = (INFRA / name).read_text(encoding="utf-8")
        assert not _secret_string(text), f"infra/{name} holds something credential-like"
        assert not re.search(r"^\s*ENV\s+\S*(KEY|TOKEN|SECRET|PASSWORD)", text, re.M | re.I)


def test_secret_finder_catches_credentials() -> None:
    """The checks above can fail."""
    assert find_secrets({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]})
    assert find_secrets({"env": [{"name": "RAY_AUTH_TOKEN", "value": "abc"}]})
    assert find_secrets({"aws_access_key_id": "AKIAIOSFODNN7EXAMPLE"})
    assert find_secrets({"note": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"})
    assert find_secrets({"file_mounts": {"~/.aws/credentials": "~/.aws/credentials"}})
    ref = {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    assert find_secrets({"env": [ref]}) == []
    assert find_secrets({"env": [{"name": "TOKENIZERS_PARALLELISM", "value": "false"}]}) == []


# --- image ------------------------------------------------------------------------------------


def dockerfile_install_problems(text: str) -> list[str]:
    """What is wrong with a Dockerfile's install step, judged against pyproject.toml: torch
    pinned inside pyproject's range from a CUDA index, then `pip install .` with no dependency
    re-listed, and every package of the project copied in."""
    problems = []
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    torch = args.get("TORCH_VERSION")
    if not torch or Version(torch) not in pyproject_requirement("torch").specifier:
        problems.append(
            f"torch pin {torch} is outside pyproject's {pyproject_requirement('torch')}"
        )
    if not re.fullmatch(r"cu[0-9]{3}", args.get("CUDA_TAG", "")):
        problems.append("CUDA_TAG is not a cuXYZ tag")
    if args.get("TORCH_INDEX_URL") != "https://download.pytorch.org/whl/${CUDA_TAG}":
        problems.append("torch does not come from the CUDA_TAG index")
    if not re.search(r'pip install .*"torch==\$\{TORCH_VERSION\}" --index-url', text):
        problems.append("torch is not installed from TORCH_INDEX_URL at TORCH_VERSION")
    targets = []
    for line in re.findall(r"pip install ([^&\n]+)", text.replace("\\\n", " ")):
        skip = False
        for tok in shlex.split(line):
            if skip:
                skip = False
            elif tok in ("--index-url", "--constraint", "-c", "-r", "--extra-index-url"):
                skip = True
            elif not tok.startswith("-"):
                targets.append(tok)
    if "." not in targets:
        problems.append("the project itself is not installed (`pip install .`)")
    deps = {Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}
    names = [re.split(r"[=<>!~\[ ;]", t, maxsplit=1)[0] for t in targets if t != "."]
    if [n for n in names if n in deps] != ["torch"]:
        problems.append(f"dependencies re-listed instead of read from pyproject: {names}")
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in [p.rstrip("*") for p in packages] + ["pyproject.toml", "README.md"]:
        if not re.search(rf"^COPY .*\b{re.escape(pkg)}\b", text, re.MULTILINE):
            problems.append(f"{pkg} is not copied into the image")
    return problems


def test_dockerfile_install_step_matches_pyproject() -> None:
    assert dockerfile_install_problems(dockerfile()) == []
    allow = (INFRA / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in [p.rstrip("*") for p in packages] + ["pyproject.toml", "README.md"]:
        assert f"!{pkg}" in allow, f"{pkg} is left out of the build context"


@pytest.mark.parametrize(
    "old, new",
    [
        ("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.14.0"),  # outside pyproject's range
        ("--constraint /tmp/constraints.txt .", "--constraint /tmp/constraints.txt ziya-batch"),
        (
            "pip install --no-cache-dir --constraint",
            "pip install transformers accelerate --constraint",
        ),
        ("COPY --chown=ray:users pipeline ./pipeline\n", ""),
        ("whl/${CUDA_TAG}", "whl/cpu"),
    ],
)
def test_dockerfile_check_catches_a_broken_install_step(old: str, new: str) -> None:
    assert old in dockerfile(), f"the Dockerfile no longer contains {old!r}: update this test"
    assert dockerfile_install_problems(dockerfile().replace(old, new))


def test_ray_version_agrees_everywhere() -> None:
    ray_version = docker_arg("RAY_VERSION")
    assert Version(ray_version) in pyproject_requirement("ray").specifier
    assert ray_version == ray.__version__, "the image's Ray differs from the development one"
    image_tag = f"ray{ray_version}-{docker_arg('CUDA_TAG')}"
    images = {docs(INFRA / "cluster-launcher.yaml")[0]["docker"]["image"]}
    for kind, spec in cluster_specs().items():
        assert spec["rayVersion"] == ray_version, kind
        for g in pod_templates(spec).values():
            images |= {c["image"] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, f"manifests name different images: {images}"
    assert next(iter(images)).endswith(image_tag), f"image tag should end with {image_tag}"
