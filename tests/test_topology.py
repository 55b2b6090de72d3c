"""Launch-environment parsing and the role topology: pure logic, no process group needed."""

import pytest

from rlhf.distributed.env import first_slurm_host, read_launch_env
from rlhf.distributed.topology import Topology
from rlhf.errors import UserError


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node1", "MASTER_PORT": "1234"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port, launch.launcher) == (
        3,
        8,
        3,
        "node1",
        1234,
        "torchrun",
    )


def test_torchrun_env_without_master_is_an_error():
    with pytest.raises(UserError, match="MASTER_ADDR"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_slurm_env_derives_master_and_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "20123"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.launcher) == (5, 16, 5, "gpu003", "slurm")
    assert launch.master_port == 20000 + 20123 % 20000


@pytest.mark.parametrize(
    "nodelist, first",
    [("node7", "node7"), ("gpu[003-005,9]", "gpu003"), ("a[1,3],b2", "a1"), ("cpu-12,cpu-13", "cpu-12")],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_ngc_env():
    launch = read_launch_env({"NGC_ARRAY_INDEX": "1", "NGC_ARRAY_SIZE": "2", "NGC_MASTER_ADDR": "10.0.0.1"})
    assert (launch.rank, launch.world_size, launch.master_addr, launch.launcher) == (1, 2, "10.0.0.1", "ngc")
    with pytest.raises(UserError, match="NGC_MASTER_ADDR"):
        read_launch_env({"NGC_ARRAY_INDEX": "1", "NGC_ARRAY_SIZE": "2"})


def test_no_launcher_is_a_single_process():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")


def test_colocated_topology():
    topo = Topology.colocated(4, ("actor", "critic", "reward", "reference"))
    assert topo.is_colocated
    assert topo.ranks("critic") == (0, 1, 2, 3)
    assert topo.dp_size("reward") == 4
    assert topo.roles_of(2) == ("actor", "critic", "reward", "reference")


def test_split_topology_like_the_seed():
    topo = Topology.split(8, {"actor": 4, "critic": 2, "reward": 1, "reference": 1})
    assert topo.ranks("actor") == (0, 1, 2, 3)
    assert topo.ranks("critic") == (4, 5)
    assert topo.ranks("reward") == (6,)
    assert topo.ranks("reference") == (7,)
    assert topo.roles_of(5) == ("critic",)
    assert topo.describe() == "actor: ranks 0-3, critic: ranks 4-5, reward: ranks 6-6, reference: ranks 7-7"


def test_split_with_shared_ranks():
    topo = Topology.split(4, {"actor": 2, "critic": 1, "reward": 1, "reference": 1}, shared=[("reward", "reference")])
    assert topo.ranks("reward") == topo.ranks("reference") == (3,)
    assert topo.roles_of(3) == ("reward", "reference")


def test_split_that_does_not_fit_the_world():
    with pytest.raises(UserError, match=r"actor 4 \+ critic 2 \+ reward 1 \+ reference 1 = 8 ranks, but the world has 4"):
        Topology.split(4, {"actor": 4, "critic": 2, "reward": 1, "reference": 1})


def test_shared_roles_with_different_sizes():
    with pytest.raises(UserError, match="different sizes"):
        Topology.split(4, {"actor": 2, "reward": 1, "reference": 2}, shared=[("reward", "reference")])


def test_unknown_role_and_missing_actor():
    with pytest.raises(UserError, match="unknown role 'vllm'"):
        Topology.colocated(2, ("actor", "vllm"))
    with pytest.raises(UserError, match="actor role must be placed"):
        Topology.split(2, {"critic": 2})
    with pytest.raises(UserError, match="at least 1 rank"):
        Topology.split(2, {"actor": 2, "critic": 0})


def test_batch_must_divide_over_a_role():
    topo = Topology.split(3, {"actor": 2, "critic": 1})
    topo.check_divides("actor", 8, "--rollout_batch_size")
    with pytest.raises(UserError, match="--rollout_batch_size 7 must be divisible by the actor data-parallel size 2"):
        topo.check_divides("actor", 7, "--rollout_batch_size")
