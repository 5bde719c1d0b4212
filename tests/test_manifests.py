"""The Kubernetes manifests of `recops manifests`: every object validated offline against its schema (Kubernetes'
own, the Prometheus operator's CRDs, KubeRay's and prometheus.yml's as tests/data/schemas states), bad objects
rejected, and what they say agreeing with the code: Triton's flags with the local launcher, paths with
recops.settings, commands with the real CLI, alert rules with the metrics recops and Triton export."""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from recops import __version__
from recops.cli import build_parser
from recops.cli import main as cli_main
from recops.configs import config_path
from recops.deploy import kuberay, workloads
from recops.deploy.objects import WORKDIR
from recops.deploy.render import MANIFESTS, render, write_manifests
from recops.deploy.values import TritonValues, Values, load_values
from recops.errors import RecopsError
from recops.ops.exposition import Exporter
from recops.serving.server import ServerConfig, TritonInstall, TritonServer
from recops.settings import ENVIRONMENT, Settings
from tests.manifest_schemas import validate_object, validate_prometheus_config, validate_rules_file

ROOT = Path(__file__).resolve().parents[1]
TRITON_METRICS = (Path(__file__).parent / "data" / "triton_metrics.txt").read_text()  # a real Triton 2.51 scrape

CUSTOM = """
namespace: ranking
image: registry.example/ml/recops
tag: "2026.11"
model_repository: /srv/triton-models
runs: /data/runs
triton: {gpus: 2, models: [dlrm, dcn], http_port: 9000, grpc_port: 9001, metrics_port: 9002}
loop: {model: dcn, metrics_port: 9500, gpus: 1}
ray: {workers: 4, worker_gpus: 2}
storage: {storage_class: fast-rwx}
monitoring: {labels: {team: ranking}, auc_drop: 0.05}
"""


def objects(rendered: dict[str, list[dict]]) -> list[dict]:
    return [doc for path, docs in rendered.items() if not path.startswith("prometheus/") for doc in docs]


def find(rendered: dict[str, list[dict]], kind: str, name: str) -> dict:
    return next(doc for doc in objects(rendered) if doc["kind"] == kind and doc["metadata"]["name"] == name)


def containers(doc: dict) -> list[dict]:
    """Every container of a Deployment or a RayCluster."""
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


@pytest.fixture(scope="module")
def default() -> dict[str, list[dict]]:
    return render(Values())


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Values, dict[str, list[dict]]]:
    path = tmp_path_factory.mktemp("values") / "values.yaml"
    path.write_text(CUSTOM)
    values = load_values(path)
    return values, render(values)


# ------------------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("which", ["default", "custom"])
def test_every_file_validates_against_its_schema(which: str, default, custom) -> None:
    rendered = default if which == "default" else custom[1]
    assert set(rendered) == set(MANIFESTS)
    kinds = set()
    for path, documents in rendered.items():
        for doc in documents:
            if path == "prometheus/prometheus.yml":
                validate_prometheus_config(doc)
            elif path.startswith("prometheus/"):
                validate_rules_file(doc)
            else:
                validate_object(doc)
                kinds.add(doc["kind"])
    assert kinds == {
        "Namespace",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "ConfigMap",
        "ServiceMonitor",
        "PrometheusRule",
        "RayCluster",
        "RayJob",
    }


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation setting the JSON-pointer-like ``path`` (list indexes as numbers, '~1' for '/') to ``value``;
    ``...`` deletes it."""

    def mutate(doc: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p.replace("~1", "/") for p in path.split("/")]
        for part in parents:
            doc = doc[part]
        if value is ...:
            del doc[last]
        else:
            doc[last] = value

    return mutate


BAD_OBJECTS = {  # id: (file, document index, mutation)
    "service-port-as-string": ("core/20-triton.yaml", 1, _set("spec/ports/0/port", "8000")),
    "deployment-without-selector": ("core/20-triton.yaml", 0, _set("spec/selector", ...)),
    "container-unknown-field": (
        "core/20-triton.yaml",
        0,
        _set("spec/template/spec/containers/0/imagePullPolice", "Always"),
    ),
    "probe-port-as-list": (
        "core/20-triton.yaml",
        0,
        _set("spec/template/spec/containers/0/readinessProbe/httpGet/port", [8000]),
    ),
    "pvc-unknown-access-field": ("core/10-storage.yaml", 0, _set("spec/accessMode", "ReadWriteMany")),
    "servicemonitor-without-selector": ("monitoring/servicemonitors.yaml", 0, _set("spec/selector", ...)),
    "servicemonitor-unknown-endpoint-field": (
        "monitoring/servicemonitors.yaml",
        0,
        _set("spec/endpoints/0/portName", "metrics"),
    ),
    "servicemonitor-port-as-number": ("monitoring/servicemonitors.yaml", 1, _set("spec/endpoints/0/port", 9400)),
    "servicemonitor-bad-interval": (
        "monitoring/servicemonitors.yaml",
        0,
        _set("spec/endpoints/0/interval", "30 seconds"),
    ),
    "rule-without-expr": ("monitoring/prometheusrule.yaml", 0, _set("spec/groups/0/rules/0/expr", ...)),
    "rule-unknown-field": ("monitoring/prometheusrule.yaml", 0, _set("spec/groups/0/rules/0/severity", "page")),
    "raycluster-without-head": ("ray/10-raycluster.yaml", 0, _set("spec/headGroupSpec", ...)),
    "raycluster-group-without-name": ("ray/10-raycluster.yaml", 0, _set("spec/workerGroupSpecs/0/groupName", ...)),
    "raycluster-replicas-as-string": ("ray/10-raycluster.yaml", 0, _set("spec/workerGroupSpecs/0/replicas", "2")),
    "raycluster-start-param-not-string": (
        "ray/10-raycluster.yaml",
        0,
        _set("spec/headGroupSpec/rayStartParams/num-cpus", 0),
    ),
    "raycluster-bad-container-in-template": (
        "ray/10-raycluster.yaml",
        0,
        _set("spec/workerGroupSpecs/0/template/spec/containers/0/gpus", 1),
    ),
    "raycluster-unknown-spec-field": ("ray/10-raycluster.yaml", 0, _set("spec/workerGroups", [])),
    "rayjob-without-cluster": ("ray/20-rayjob-sweep.yaml", 0, _set("spec/clusterSelector", ...)),
    "rayjob-empty-cluster-name": ("ray/20-rayjob-sweep.yaml", 0, _set("spec/clusterSelector/ray.io~1cluster", "")),
    "rayjob-bad-mode": ("ray/20-rayjob-sweep.yaml", 0, _set("spec/submissionMode", "K8sJob")),
    "configmap-data-not-string": ("ray/00-sweep-config.yaml", 0, _set("data/sweep.yaml", {"name": "x"})),
}


@pytest.mark.parametrize("case", sorted(BAD_OBJECTS))
def test_bad_objects_are_rejected(case: str, default) -> None:
    path, index, mutate = BAD_OBJECTS[case]
    doc = copy.deepcopy(default[path][index])
    validate_object(doc)  # valid before the mutation
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_object(doc)


@pytest.mark.parametrize(
    "mutate",
    [
        _set("scrape_configs/0/relabel_configs/0/action", "keeep"),
        _set("scrape_configs/0/job_name", ...),
        _set("scrape_configs/0/kubernetes_sd_configs/0/role", "deployment"),
        _set("global/scrape_interval", "30 s"),
        _set("scrape_configs/0/scrape_every", "30s"),
    ],
    ids=["bad-action", "no-job-name", "bad-role", "bad-duration", "unknown-key"],
)
def test_bad_prometheus_config_is_rejected(mutate, default) -> None:
    doc = copy.deepcopy(default["prometheus/prometheus.yml"][0])
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_prometheus_config(doc)


def test_bad_rules_file_is_rejected(default) -> None:
    doc = copy.deepcopy(default["prometheus/recops-rules.yml"][0])
    doc["groups"][0]["rules"][0]["for"] = "fifteen minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate_rules_file(doc)


# ------------------------------------------------------------------------------- agreement with the code


def test_triton_runs_with_the_launchers_deployer_flags(custom) -> None:
    """What serving/server.py passes a local Triton for the deployer is what the Deployment passes."""
    values, rendered = custom
    args = containers(find(rendered, "Deployment", "recops-triton"))[0]["args"]
    install = TritonInstall(Path("/opt/tritonserver"), Path("/b"), Path("/s"), ())
    local = TritonServer(ServerConfig(repo=Path(values.model_repository), load_models=values.triton.models))
    flags = ("--model-repository=", "--model-control-mode=", "--strict-readiness=", "--load-model=")
    local_flags = [a for a in local.command(install, (1, 2, 3)) if a.startswith(flags)]
    assert local_flags == [a for a in args if a.startswith(flags)]
    assert {"--model-control-mode=explicit", "--strict-readiness=false"} <= set(args)
    assert [a for a in args if a.startswith("--load-model=")] == ["--load-model=dlrm", "--load-model=dcn"]


def test_model_repository_path_agrees_everywhere(custom) -> None:
    values, rendered = custom
    triton = containers(find(rendered, "Deployment", "recops-triton"))[0]
    loop = containers(find(rendered, "Deployment", "recops-loop"))[0]
    assert f"--model-repository={values.model_repository}" in triton["args"]
    for container in (triton, loop):
        assert {"name": "models", "mountPath": "/srv/triton-models"} in container["volumeMounts"]
    # recops in the loop pod reads its settings from the environment the manifest gives it
    settings = Settings.from_env(env_of(loop))
    assert settings.model_repository == Path("/srv/triton-models")
    assert settings.registry == Path("/data/runs/registry") and settings.datasets == Path("/data/runs/datasets")
    assert set(env_of(loop)) == {variable for variable, _ in ENVIRONMENT.values()}


def test_every_recops_pod_agrees_on_locations(custom) -> None:
    values, rendered = custom
    pods = [
        c
        for kind, name in (("Deployment", "recops-loop"), ("RayCluster", "recops-ray"))
        for c in containers(find(rendered, kind, name))
    ]
    assert len(pods) == 3
    for container in pods:
        settings = Settings.from_env(env_of(container))
        for location in (settings.runs, settings.datasets, settings.sweeps, settings.registry):
            assert location.is_absolute() and location.is_relative_to(values.runs)
        assert {"name": "runs", "mountPath": values.runs} in container["volumeMounts"]


def test_ports_agree_between_args_containers_services_and_monitors(custom) -> None:
    values, rendered = custom
    t = values.triton
    triton = containers(find(rendered, "Deployment", "recops-triton"))[0]
    ports = {f"--http-port={t.http_port}", f"--grpc-port={t.grpc_port}", f"--metrics-port={t.metrics_port}"}
    assert ports <= set(triton["args"])
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"http": 9000, "grpc": 9001, "metrics": 9002}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert triton[probe]["httpGet"]["port"] in {p["name"] for p in triton["ports"]}
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for monitor in (d for d in objects(rendered) if d["kind"] == "ServiceMonitor"):
        service = find(rendered, "Service", monitor["metadata"]["name"])
        deployment = find(rendered, "Deployment", monitor["metadata"]["name"])
        selected = monitor["spec"]["selector"]["matchLabels"]
        assert selected.items() <= service["metadata"]["labels"].items()
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        port = next(p for p in service["spec"]["ports"] if p["name"] == monitor["spec"]["endpoints"][0]["port"])
        pod_ports = {p["name"]: p["containerPort"] for c in containers(deployment) for p in c["ports"]}
        assert pod_ports[port["targetPort"]] == port["port"]
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [values.namespace]
        assert monitor["metadata"]["labels"]["team"] == "ranking"
    config = rendered["prometheus/prometheus.yml"][0]
    for job in config["scrape_configs"]:
        service_name, port_name = job["relabel_configs"][0]["regex"].split(";")
        assert port_name in {p["name"] for p in find(rendered, "Service", service_name)["spec"]["ports"]}
        assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [values.namespace]


def test_loop_command_is_what_the_real_cli_parses(custom) -> None:
    values, rendered = custom
    args = containers(find(rendered, "Deployment", "recops-loop"))[0]["args"]
    assert args[0] == "recops"
    parsed = build_parser().parse_args(args[1:])
    assert parsed.command == "loop" and parsed.name == "dcn" and parsed.follow
    assert parsed.url == "http://recops-triton:9000" and parsed.metrics_url == "http://recops-triton:9002/metrics"
    assert parsed.metrics_port == 9500 and parsed.metrics_address == "0.0.0.0"
    assert parsed.state_dir == Path("/data/runs/loop") and parsed.stream == Path("/data/runs/stream")
    service = find(rendered, "Service", "recops-loop")
    assert [p["port"] for p in service["spec"]["ports"]] == [parsed.metrics_port]


def test_sweep_job_runs_the_shipped_config_on_the_runs_volume(custom) -> None:
    values, rendered = custom
    job = find(rendered, "RayJob", "recops-sweep")
    parsed = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    assert parsed.command == "sweep" and parsed.address == "auto"
    cluster = find(rendered, "RayCluster", "recops-ray")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "sweep-config")
    volume = next(v for v in head["volumes"] if v["name"] == "sweep-config")
    config_map = find(rendered, "ConfigMap", volume["configMap"]["name"])
    assert parsed.config == Path(mount["mountPath"]) / next(iter(config_map["data"]))
    sweep = yaml.safe_load(config_map["data"][parsed.config.name])
    env = env_of(containers(find(rendered, "RayCluster", "recops-ray"))[0])
    assert sweep["dataset"]["root"] == env["RECOPS_DATASETS"] and sweep["storage_path"] == env["RECOPS_SWEEPS"]
    shipped = yaml.safe_load(config_path("sweep_gpu.yaml").read_text())
    assert {k: v for k, v in sweep.items() if k not in ("dataset", "storage_path")} == {
        k: v for k, v in shipped.items() if k not in ("dataset", "storage_path")
    }


def test_ray_cluster_runs_the_pinned_ray_on_gpu_workers(custom) -> None:
    values, rendered = custom
    cluster = find(rendered, "RayCluster", "recops-ray")
    pin = re.search(r"^\s*ray\[tune\]==(\S+)$", (ROOT / "setup.cfg").read_text(), re.M).group(1)
    assert cluster["spec"]["rayVersion"] == pin == kuberay.ray_version()
    workers = cluster["spec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_one_image_tag_namespace_and_gpu_counts_from_the_values(default, custom) -> None:
    assert {
        c["image"] for d in objects(default) if d["kind"] in ("Deployment", "RayCluster") for c in containers(d)
    } == {f"recops:{__version__}"}
    values, rendered = custom
    images = {c["image"] for d in objects(rendered) if d["kind"] in ("Deployment", "RayCluster") for c in containers(d)}
    assert images == {"registry.example/ml/recops:2026.11"}
    assert {d["metadata"].get("namespace", d["metadata"]["name"]) for d in objects(rendered)} == {"ranking"}
    triton = containers(find(rendered, "Deployment", "recops-triton"))[0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert containers(find(rendered, "Deployment", "recops-loop"))[0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    claims = [c for c in objects(rendered) if c["kind"] == "PersistentVolumeClaim"]
    assert len(claims) == 2 and all(c["spec"]["storageClassName"] == "fast-rwx" for c in claims)
    assert all("storageClassName" not in c["spec"] for c in objects(default) if c["kind"] == "PersistentVolumeClaim")


def test_no_gpus_means_no_gpu_requests_or_tolerations() -> None:
    rendered = render(Values(triton=TritonValues(gpus=0)))
    pod = find(rendered, "Deployment", "recops-triton")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"] and "tolerations" not in pod
    validate_object(find(rendered, "Deployment", "recops-triton"))


def _selectors(expr: str) -> set[str]:
    """Metric names an expression reads, from its parse tree."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.add(node.name)
        for attribute in ("lhs", "rhs", "expr", "vector_selector", "args", "param"):
            child = getattr(node, attribute, None)
            for item in child if isinstance(child, list) else [child]:
                if item is not None and not isinstance(item, (str, int, float)):
                    walk(item)

    walk(promql_parser.parse(expr))
    return found


def test_alert_rules_read_only_metrics_that_recops_and_triton_export(default) -> None:
    exported = {m.name for m in Exporter().registry.collect()}  # what `recops loop --metrics-port` serves
    triton = {f.name for f in text_string_to_metric_families(TRITON_METRICS)}
    groups = default["monitoring/prometheusrule.yaml"][0]["spec"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["alert"] for r in rules} == {
        "RecopsDriftDetected",
        "RecopsOnlineAucDrop",
        "RecopsNoFeedback",
        "TritonInferenceFailures",
        "TritonHighLatency",
    }
    read: set[str] = set()
    for rule in rules:
        names = _selectors(rule["expr"])
        assert names, rule["expr"]
        read |= names
    assert {n for n in read if n.startswith("recops_")} <= exported
    assert {n for n in read if not n.startswith("recops_")} <= triton
    assert {"recops_drift_drifted_features", "recops_online_auc", "nv_inference_request_failure"} <= read
    assert default["prometheus/recops-rules.yml"][0]["groups"] == groups


def test_selector_walk_catches_a_metric_that_does_not_exist() -> None:
    expr = "sum by (model) (rate(nv_inference_requests_total[5m])) / 2 > 1"
    assert _selectors(expr) == {"nv_inference_requests_total"}
    with pytest.raises(ValueError):
        promql_parser.parse("rate(recops_online_auc[5m]")


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, argument) pairs of Dockerfile.gpu, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile.gpu").read_text())
    return [
        tuple(line.split(None, 1))
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and len(line.split(None, 1)) == 2
    ]


def test_dockerfile_serves_what_the_manifests_and_the_deployer_expect() -> None:
    values, lines = Values(), _dockerfile()
    cmd = json.loads(next(arg for op, arg in lines if op == "CMD" and arg.startswith('["tritonserver"')))
    assert f"--model-repository={values.model_repository}" in cmd and set(workloads.DEPLOYER_FLAGS) <= set(cmd)
    env = " ".join(arg for op, arg in lines if op == "ENV")
    assert f"RECOPS_MODEL_REPOSITORY={values.model_repository}" in env.split()
    exposed = {int(p) for op, arg in lines if op == "EXPOSE" for p in arg.split()}
    assert exposed == {values.triton.http_port, values.triton.grpc_port, values.triton.metrics_port}
    assert [arg for op, arg in lines if op == "WORKDIR"][-1] == WORKDIR
    assert f"RECOPS_UID={values.uid}" in [arg for op, arg in lines if op == "ARG"]
    copied = {arg.split()[0].rstrip("/") for op, arg in lines if op == "COPY" and not arg.startswith("--")}
    package_dirs = re.search(r"package_dir =\n((?:\s+.+\n)+)", (ROOT / "setup.cfg").read_text()).group(1)
    assert {line.split("=")[1].strip() for line in package_dirs.strip().splitlines()} <= copied


# --------------------------------------------------------------------------------------------- values


def test_shipped_values_file_lists_every_key_with_its_default() -> None:
    assert load_values(ROOT / "deploy" / "values.yaml") == Values()
    assert load_values(None) == Values()
    listed = yaml.safe_load((ROOT / "deploy" / "values.yaml").read_text())
    sections = {f.name for f in fields(Values) if is_dataclass(f.default_factory)}
    assert sections == {"triton", "loop", "ray", "storage", "monitoring"}
    assert set(listed) == {f.name for f in fields(Values)} - {"tag"}  # tag: commented, it follows the version
    for section in sections:
        assert set(listed[section]) == {f.name for f in fields(getattr(Values(), section))}


BAD_VALUES = {
    "unknown top-level key": ("namspace: x\n", "unknown key namspace"),
    "unknown nested key": ("triton: {gpu: 2}\n", "unknown key triton.gpu; known keys there: gpus"),
    "wrong type": ("triton: {gpus: two}\n", "triton.gpus must be int, got 'two'"),
    "bool for int": ("loop: {gpus: true}\n", "loop.gpus must be int"),
    "port as string": ("triton: {http_port: '8000'}\n", "triton.http_port must be int"),
    "port out of range": ("loop: {metrics_port: 70000}\n", "loop.metrics_port must be a port number"),
    "clashing ports": ("triton: {grpc_port: 8000}\n", "triton ports must differ"),
    "bad quantity": ("triton: {memory: 16 GB}\n", "triton.memory must be a Kubernetes quantity"),
    "relative repository": ("model_repository: models\n", "model_repository is a path inside the containers"),
    "escaping stream dir": ("loop: {stream: ../x}\n", "loop.stream is a directory under `runs`"),
    "bad model name": ("triton: {models: ['../x']}\n", "model name '../x' is invalid"),
    "models not a list": ("triton: {models: dlrm}\n", "triton.models must be a list"),
    "label value not a string": ("monitoring: {labels: {release: 1}}\n", "monitoring.labels.release must be str"),
    "bad namespace": ("namespace: Recops_Prod\n", "namespace must be a DNS label"),
    "bad tag": ("tag: 'v1+local'\n", "is not a valid image tag"),
    "bad duration": ("monitoring: {interval: 30 seconds}\n", "monitoring.interval must be a Prometheus duration"),
    "bad access mode": ("storage: {access_mode: RWX}\n", "storage.access_mode must be one of"),
    "not a mapping": ("- a\n- b\n", "must be a mapping of keys"),
    "section not a mapping": ("triton: 2\n", "triton must be a mapping of keys"),
    "invalid yaml": ("triton: {gpus: 1\n", "is not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_name_the_file_the_key_and_the_fix(case: str, tmp_path: Path) -> None:
    text, expected = BAD_VALUES[case]
    path = tmp_path / "values.yaml"
    path.write_text(text)
    with pytest.raises(RecopsError) as caught:
        load_values(path)
    assert str(path) in str(caught.value) and expected in str(caught.value)


def test_missing_values_file_and_unknown_sweep_config(tmp_path: Path) -> None:
    with pytest.raises(RecopsError, match="cannot read it"):
        load_values(tmp_path / "nope.yaml")
    (tmp_path / "values.yaml").write_text("ray: {sweep_config: no_such_sweep.yaml}\n")
    with pytest.raises(RecopsError, match="no shipped config 'no_such_sweep.yaml'"):
        write_manifests(tmp_path / "out", load_values(tmp_path / "values.yaml"))
    assert not (tmp_path / "out").exists()  # rendering failed before anything was written


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_every_file_atomically_and_reports_them(tmp_path: Path, capsys) -> None:
    out = tmp_path / "manifests"
    (tmp_path / "values.yaml").write_text(CUSTOM)
    assert cli_main(["manifests", "--out", str(out), "--values", str(tmp_path / "values.yaml"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["files"] == list(MANIFESTS) and result["image"] == "registry.example/ml/recops:2026.11"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(MANIFESTS)  # no temporary files left behind
    documents = [d for d in yaml.safe_load_all((out / "core/20-triton.yaml").read_text())]
    assert [d["kind"] for d in documents] == ["Deployment", "Service"]
    assert documents == render(load_values(tmp_path / "values.yaml"))["core/20-triton.yaml"]
    assert "&id" not in (out / "ray/10-raycluster.yaml").read_text()  # no YAML anchors for kubectl users


def test_cli_bad_values_exit_2_with_one_line_and_write_nothing(tmp_path: Path, capsys) -> None:
    (tmp_path / "values.yaml").write_text("triton:\n  gpus: two\n")
    code = cli_main(["manifests", "--out", str(tmp_path / "out"), "--values", str(tmp_path / "values.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "triton.gpus must be int" in err and not (tmp_path / "out").exists()
