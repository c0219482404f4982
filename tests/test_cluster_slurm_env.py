"""cluster.slurm_env: SLURM variables -> host list, hostfile, ranks, rendezvous, launch commands.

The generated commands are parsed back with torchrun's and DeepSpeed's own argument parsers
and the hostfile with DeepSpeed's own hostfile reader.
"""

import pytest

from cluster import slurm_env
from cluster.slurm_env import Allocation, SlurmEnvError, expand_nodelist


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("node7", ["node7"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("x-[3,1],y[5]-ib", ["x-3", "x-1", "y5-ib"]),
        (" h1,h2 ", ["h1", "h2"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, message",
    [
        ("gpu[1-4", "unclosed"),
        ("gpu]1", "unmatched"),
        ("gpu[4-1]", "backwards"),
        ("gpu[a-b]", "bad range"),
        ("gpu[]", "bad range"),
        ("a,,b", "empty host"),
        ("a[1-2],a2", "listed twice"),
        ("a[[1]]", "nested"),
    ],
)
def test_expand_nodelist_rejects(nodelist, message):
    with pytest.raises(SlurmEnvError, match=message):
        expand_nodelist(nodelist)


def fake_env(**extra):
    env = {
        "SLURM_JOB_NODELIST": "gpu[01-04,07]",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NUM_NODES": "5",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_NODEID": "0",
    }
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def test_allocation_from_env():
    alloc = Allocation.from_env(fake_env(SLURM_NODEID="3"))
    assert alloc.nodes == ("gpu01", "gpu02", "gpu03", "gpu04", "gpu07")
    assert (alloc.num_nodes, alloc.gpus, alloc.world_size, alloc.node_rank) == (5, 8, 40, 3)
    assert alloc.master_addr == "gpu01"
    assert alloc.master_port == slurm_env.PORT_BASE + 123456 % slurm_env.PORT_SPAN
    assert Allocation.from_env(fake_env(MASTER_PORT="29400")).master_port == 29400


@pytest.mark.parametrize("value, gpus", [("8", 8), ("a100:4", 4), ("gpu:h100:2", 2)])
def test_gpus_per_node_from_slurm_gpus_per_node(value, gpus):
    env = fake_env(SLURM_GPUS_ON_NODE=None, SLURM_GPUS_PER_NODE=value)
    assert Allocation.from_env(env).gpus == gpus
    assert Allocation.from_env(env, gpus_per_node=1).gpus == 1  # the explicit count wins


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not set"),
        ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID"),
        ({"SLURM_JOB_NUM_NODES": "4"}, "expands to 5 hosts"),
        ({"SLURM_NODEID": "5"}, "outside the 5 allocated nodes"),
        ({"SLURM_NODEID": "x"}, "SLURM_NODEID='x'"),
        ({"SLURM_GPUS_ON_NODE": "eight"}, "SLURM_GPUS_ON_NODE"),
        ({"MASTER_PORT": "80"}, "MASTER_PORT=80"),
    ],
)
def test_allocation_rejects(changes, message):
    with pytest.raises(SlurmEnvError, match=message):
        Allocation.from_env(fake_env(**changes))


def test_unknown_gpu_count_is_an_error_only_where_needed():
    alloc = Allocation.from_env(fake_env(SLURM_GPUS_ON_NODE=None))
    assert "--num-gpus" not in " ".join(slurm_env.ray_head_command(alloc))
    with pytest.raises(SlurmEnvError, match="GPUs per node unknown"):
        slurm_env.hostfile(alloc)


def test_ranks_cover_the_world_once_in_node_order():
    alloc = Allocation.from_env(
        fake_env(SLURM_JOB_NODELIST="a[1-2],b3", SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="4")
    )
    table = slurm_env.ranks(alloc)
    assert [r.rank for r in table] == list(range(12))
    assert [(r.host, r.local_rank) for r in table[4:8]] == [("a2", i) for i in range(4)]
    assert {r.host: r.node_rank for r in table} == {"a1": 0, "a2": 1, "b3": 2}


def test_hostfile_reads_back_with_deepspeeds_parser():
    from deepspeed.launcher.runner import _parse_hostfile

    alloc = Allocation.from_env(fake_env())
    pool = _parse_hostfile(slurm_env.hostfile(alloc).splitlines())
    assert list(pool.items()) == [(h, 8) for h in ("gpu01", "gpu02", "gpu03", "gpu04", "gpu07")]


def test_torchrun_command_parses_with_torchruns_parser():
    from torch.distributed.run import get_args_parser

    alloc = Allocation.from_env(fake_env(SLURM_NODEID="2"))
    cmd = slurm_env.torchrun_command(alloc, ["--config", "run.yaml", "optim.lr=1e-4"])
    assert cmd[0] == "torchrun"
    args = get_args_parser().parse_args(cmd[1:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("5", "8", 2)
    assert (args.master_addr, args.master_port) == ("gpu01", alloc.master_port)
    assert args.rdzv_backend == "static" and args.max_restarts == 0
    assert args.module and args.training_script == slurm_env.TRAIN_MODULE
    assert args.training_script_args == ["--config", "run.yaml", "optim.lr=1e-4"]
    assert "SIGUSR1" in args.signals_to_handle.split(",")


def test_deepspeed_command_parses_with_deepspeeds_parser():
    from deepspeed.launcher.runner import parse_args

    alloc = Allocation.from_env(fake_env())
    cmd = slurm_env.deepspeed_command(alloc, "/tmp/hostfile", ["--config", "run.yaml"])
    args = parse_args(cmd[1:])
    assert (args.hostfile, args.num_nodes, args.num_gpus) == ("/tmp/hostfile", 5, 8)
    assert (args.master_addr, args.master_port) == ("gpu01", alloc.master_port)
    assert args.module and args.user_script == slurm_env.TRAIN_MODULE
    assert args.user_args == ["--config", "run.yaml"]


def test_ray_commands_point_workers_and_jobs_at_the_head():
    alloc = Allocation.from_env(fake_env())
    assert "--head" in slurm_env.ray_head_command(alloc)
    assert f"--address=gpu01:{slurm_env.RAY_PORT}" in slurm_env.ray_worker_command(alloc)
    submit = slurm_env.ray_submit_command(alloc, ["cogvideo-prep", "--input", "/d"])
    assert submit[:3] == ["ray", "job", "submit"]
    assert submit[submit.index("--") + 1 :] == ["cogvideo-prep", "--input", "/d"]
    with pytest.raises(SlurmEnvError, match="give the job command"):
        slurm_env.ray_submit_command(alloc, [])


def test_cli_dry_run_prints_every_nodes_command(monkeypatch, capsys):
    for key, value in fake_env().items():
        monkeypatch.setenv(key, value)
    slurm_env.main(["torchrun", "--dry-run", "--all-nodes", "--", "--config", "a b.yaml"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0::2] == [
        f"# node {i} ({h})" for i, h in enumerate(["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"])
    ]
    assert all(
        f"--node-rank={i} " in line and line.endswith("--config 'a b.yaml'")
        for i, line in enumerate(lines[1::2])
    )

    slurm_env.main(["env"])
    assert "WORLD_SIZE=40" in capsys.readouterr().out.splitlines()


def test_cli_reports_bad_allocation(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    with pytest.raises(SystemExit, match="SLURM_JOB_NODELIST is not set"):
        slurm_env.main(["hostfile"])
