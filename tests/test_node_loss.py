"""Node loss: a real 2-node local Ray cluster (`ray.cluster_utils.Cluster`, one engine's worth of CPUs per
node) running `train` with engines from the real engine PEX; the node of one engine is killed
mid-iteration (its raylet and everything on it, as when a VM goes away). With spare capacity the engine
is re-created there and the run ends exactly as the undisturbed one; without, the run waits the engine
start timeout, checkpoints and stops with a message saying why, and `--resume` on new capacity ends
exactly as the undisturbed run too."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray
from engine_pex_root import ENGINE_PEX_ROOT
from ray.cluster_utils import Cluster
from train_scenarios import assert_same_metrics, checkpoint_kinds, train_iterations

from driver import train

ENGINE_PEX = Path("src.engine/engine.pex")
ITERATIONS = 3
COMMON = [
    "--engine-pex", str(ENGINE_PEX), "--no-build-engine", "--engine-python", sys.executable,
    "--pex-root", ENGINE_PEX_ROOT, "--num-engines", "2", "--engine-cpus", "1", "--population", "4",
    "--prompts-per-member", "4", "--max-new-tokens", "16", "--batch-size", "4", "--eval-size", "4",
    "--eval-every", "0", "--checkpoint-every", "2", "--sigma", "0.01", "--alpha", "0.005",
    "--iterations", str(ITERATIONS), "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """A head node and one worker node, 1 CPU each: the two engines land one per node."""
    with pytest.MonkeyPatch.context() as patch:
        # Cluster records its address in /tmp/ray/ray_current_cluster, where a plain `ray.init()` of any
        # other test process running meanwhile would find and join it.
        patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def reference_run(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train.main([*COMMON, "--model-dir", "none", "--output-dir", str(out)]) == train.EXIT_OK
    return out


def kill_worker_nodes(cluster: Cluster, keep=None) -> None:
    """Kills every process of every worker node but `keep`: its raylet and the engine actor on it
    included."""
    for node in list(cluster.worker_nodes):
        if node is not keep:
            cluster.remove_node(node, allow_graceful=False)


def test_the_engine_of_a_dead_node_is_recreated_on_remaining_capacity(
    cluster, reference_run, tmp_path, capsys
):
    out = tmp_path / "run"
    done = []

    def add_capacity_then_kill_a_node_in_iteration_1(trainer, iteration, member, engine):
        if iteration == 1 and not done:
            done.append(cluster.add_node(num_cpus=1))  # the spare node
            cluster.wait_for_nodes()
            kill_worker_nodes(cluster, keep=done[0])

    args = [*COMMON, "--model-dir", str(reference_run / "base-model"), "--output-dir", str(out)]
    assert train.main(args, on_member_done=add_capacity_then_kill_a_node_in_iteration_1) == train.EXIT_OK
    assert done
    assert "warning: engine" in capsys.readouterr().out
    assert_same_metrics(out, reference_run)


def test_without_capacity_the_run_checkpoints_stops_and_resumes(cluster, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    killed = []

    def kill_a_node_in_iteration_1(trainer, iteration, member, engine):
        if iteration == 1 and not killed:
            kill_worker_nodes(cluster)
            killed.append(iteration)

    args = [*COMMON, "--model-dir", str(reference_run / "base-model"), "--output-dir", str(out)]
    status = train.main([*args, "--engine-start-timeout", "20"], on_member_done=kill_a_node_in_iteration_1)
    assert status == train.EXIT_FAILED
    err = capsys.readouterr().err
    assert "the cluster had no free capacity for 1 engine(s)" in err
    assert "The run stopped after 1 updates, checkpointed in" in err and "--resume" in err
    assert checkpoint_kinds(out) == {"iter-000001": "compact"}
    assert train_iterations(out) == [0]

    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    assert train.main([*args, "--resume"]) == train.EXIT_OK
    assert_same_metrics(out, reference_run)
