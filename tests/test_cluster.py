"""Every resource and accelerator type the shipped configs ask for exists in cluster.yaml
(and in the KubeRay manifest), so a submitted job cannot wait forever for a node type that
the autoscaler will never start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deliberate_ray.config import EngineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def cluster_node_resources() -> dict[str, dict[str, float]]:
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    return {name: t.get("resources", {}) for name, t in cluster["available_node_types"].items()}


def kuberay_node_resources() -> dict[str, dict[str, float]]:
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    out = {}
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        res = {"CPU": float(params.get("num-cpus", 0)), "GPU": float(params.get("num-gpus", 0))}
        if "resources" in params:
            res |= json.loads(json.loads(params["resources"]))
        out[group["groupName"]] = res
    return out


def engine_requests(engine: EngineConfig) -> list[dict[str, float]]:
    """One resource bundle per engine replica (a vLLM replica spans its TP x PP GPUs)."""
    if engine.kind == "http":
        return []
    if engine.kind == "vllm":
        kw = engine.engine_kwargs
        gpus = kw.get("tensor_parallel_size", 1) * kw.get("pipeline_parallel_size", 1)
        bundle = {"GPU": float(gpus)}
    else:
        bundle = {"CPU": engine.num_cpus, "GPU": engine.num_gpus}
    if engine.accelerator_type:
        bundle[f"accelerator_type:{engine.accelerator_type}"] = 0.001
    return [bundle]


def requests_of(path: Path) -> list[tuple[str, dict[str, float]]]:
    cfg = load_config(path)
    out: list[tuple[str, dict[str, float]]] = []
    if cfg.generate:
        out += [("teacher", b) for b in engine_requests(cfg.generate.teacher.engine)]
        if cfg.generate.judge.llm.enabled:
            out += [("judge", b) for b in engine_requests(cfg.generate.judge.llm.engine)]
    if cfg.train:
        per_worker = dict(cfg.train.resources_per_worker)
        if cfg.train.use_gpu:
            per_worker.setdefault("GPU", 1.0)
        out.append(("train worker", per_worker))
    if cfg.serve:
        out.append(("serve replica", {"CPU": cfg.serve.num_cpus, "GPU": cfg.serve.num_gpus}))
    return out


def fits(bundle: dict[str, float], nodes: dict[str, dict[str, float]]) -> bool:
    wanted = {k: v for k, v in bundle.items() if v > 0}
    return any(all(node.get(k, 0) >= v for k, v in wanted.items()) for node in nodes.values())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
@pytest.mark.parametrize("nodes_of", [cluster_node_resources, kuberay_node_resources])
def test_config_requests_exist_in_cluster(path: Path, nodes_of):
    nodes = nodes_of()
    for who, bundle in requests_of(path):
        assert fits(bundle, nodes), f"{path.name}: {who} asks for {bundle}; nodes offer {nodes}"


def test_cluster_configs_ask_for_gpus():
    """The check above must have something to check: the cluster configs use GPUs."""
    cluster_cfgs = [p for p in CONFIGS if "cluster" in p.name]
    assert cluster_cfgs
    asked = [b for p in cluster_cfgs for _, b in requests_of(p)]
    assert any(b.get("GPU", 0) >= 1 for b in asked)
    assert any(k.startswith("accelerator_type:") for b in asked for k in b)


def test_fits_rejects_what_no_node_offers():
    nodes = cluster_node_resources()
    assert not fits({"GPU": 1, "accelerator_type:H200": 0.001}, nodes)
    assert not fits({"GPU": 16}, nodes)
    assert fits({"GPU": 8, "accelerator_type:A100-80G": 0.001}, nodes)


def test_secrets_reach_nodes_by_environment_and_the_dashboard_stays_private():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head and "--dashboard-host=" in head
    for cmds in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert "HF_TOKEN" in " ".join(cmds) and "DELIBERATE_RAY_API_KEY" in " ".join(cmds)
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        env_from = g["template"]["spec"]["containers"][0].get("envFrom", [])
        assert {"secretRef": {"name": "deliberate-ray-secrets", "optional": True}} in env_from
    assert "HF_TOKEN" not in job["spec"].get("runtimeEnvYAML", "")
    readme = (ROOT / "README.md").read_text()
    assert '--runtime-env-json \'{"env_vars": {"HF_TOKEN"' not in readme


def test_shared_storage_that_the_configs_use_is_mounted_on_every_node():
    """Cluster configs keep run_dir (checkpoints, exports the Serve replicas load, eval
    outputs) under /mnt/cluster_storage: cluster.yaml mounts it on every node at start and
    the RayJob mounts it in every pod."""
    mount = "/mnt/cluster_storage"
    used = [
        p.name
        for p in sorted((ROOT / "configs").glob("*cluster*.yaml"))
        if yaml.safe_load(p.read_text())["run_dir"].startswith(mount)
    ]
    assert used, "the cluster configs no longer use the shared mount: update this test"
    setup = " ".join(yaml.safe_load((ROOT / "cluster.yaml").read_text())["setup_commands"])
    assert "mount -t nfs4" in setup and mount in setup
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    pods = [job["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in job["workerGroupSpecs"]
    ]
    for pod in pods:
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert mounts.get(mount) in claims
