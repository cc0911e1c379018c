"""A pipeline on a multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head and two worker
nodes, real raylets on this machine, each with one logical GPU), with the test stack's S3 and
MLflow: jobs land on different nodes, and a job whose node leaves resumes on the other."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import stack
from support import genforge, genforge_background, keys, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the module (starting one costs its raylets): the spread test uses both
    worker nodes, the node-loss test, after it, removes one."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
    nodes = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    c.shutdown()


def cluster_auth(local_stack) -> dict[str, str]:
    """The cluster was started from this process, with the stack's token (see conftest): a
    user pointing RAY_ADDRESS at a cluster sets its token the same way."""
    return stack.ray_auth_env(Path(local_stack.home))


def train(name: str, steps: int, **extra) -> dict:
    return {"name": name, "kind": "train", "family": "ddpm",
            "model": {"channels": 8, "channel_mult": [1], "timesteps": 20},
            "train": {"steps": steps, "batch_size": 8, "log_every": 2, "sample_images": 2,
                      **extra},
            "resources": {"gpus": 1, "cpus": 1, "max_restarts": 2}}


def spec(experiment: str, *jobs: dict) -> dict:
    return {"experiment": experiment,
            "defaults": {"data": {"dataset": "digits", "image_size": 8}}, "jobs": list(jobs)}


def runs(local_stack, experiment: str) -> dict:
    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    return {r.data.tags.get("genforge.job"): r for r in client.search_runs([exp.experiment_id])
            if "genforge.job" in r.data.tags}


def test_jobs_spread_over_the_nodes(tmp_path, cluster, local_stack, stack_env):
    c, nodes = cluster
    env = {**stack_env, "RAY_ADDRESS": c.address, **cluster_auth(local_stack)}
    path = write_spec(tmp_path / "two.yaml", spec("e2e-two-nodes", train("a", 40), train("b", 40)))
    out = genforge(["run", str(path)], env)
    assert out.returncode == 0, out.stderr[-3000:]
    found = runs(local_stack, "e2e-two-nodes")
    used = {found[name].data.tags["genforge.node"] for name in ("a", "b")}
    # each job needs the one GPU of a node, and they overlap in time: one per worker node;
    # the two jobs differ only in name, so one hash, but each has its own run
    assert found["a"].info.run_id != found["b"].info.run_id
    assert used == {n.node_id for n in nodes}


def test_a_job_whose_node_leaves_resumes_on_another(tmp_path, cluster, local_stack, stack_env,
                                                   s3_client):
    c, nodes = cluster
    env = {**stack_env, "RAY_ADDRESS": c.address, **cluster_auth(local_stack)}
    path = write_spec(tmp_path / "one.yaml",
                      spec("e2e-node-loss", train("long", 3000, checkpoint_every=50)))
    proc = genforge_background(["run", str(path)], env, tmp_path / "run.log")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # until it has a checkpoint and says where it runs
            run = runs(local_stack, "e2e-node-loss").get("long")
            first = run.data.tags.get("genforge.node") if run else None
            if first and any(k.endswith("manifest.json") for k in
                             keys(s3_client, local_stack.bucket, "genforge/e2e-node-loss/long/")):
                break
            time.sleep(1)
        else:
            pytest.fail("the job never saved a checkpoint")
        c.remove_node(next(n for n in nodes if n.node_id == first))
        assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    run = runs(local_stack, "e2e-node-loss")["long"]
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    log = (tmp_path / "run.log").read_text()
    assert tags["genforge.node.1"] == first and tags.get("genforge.node.2") not in (None, first), log
    assert int(tags["genforge.resumed_at_step"]) > 50  # from its last checkpoint, not step 1
    assert "worker died" in log and "resuming from its last checkpoint" in log
