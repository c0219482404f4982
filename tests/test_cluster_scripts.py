"""The shell launch files: syntax, shellcheck, dry runs for a fake allocation, and the
preemption path (USR1 -> launcher -> requeue) with stand-in srun/scontrol commands."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [
    REPO / "cluster" / name
    for name in (
        "slurm/train.sbatch",
        "slurm/ray.sbatch",
        "slurm/nccl.env",
        "deepspeed/launch.sh",
        "ray/submit.sh",
    )
]
HOSTS = ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]
CONFIG = "configs/cogvideo_stage1.yaml"


def slurm_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RAY_ADDRESS"))}
    env.update(
        SLURM_JOB_NODELIST="gpu[01-04,07]", SLURM_JOB_ID="42", SLURM_GPUS_ON_NODE="8", PYTHON=sys.executable
    )
    env.update(extra)
    return env


def run(args, env, cwd=REPO, check=True):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_scripts_parse():
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def shellcheck(*paths, cwd=REPO) -> subprocess.CompletedProcess:
    """shellcheck over `paths`; .ci/run installs it, so under CI (CI=true) its absence fails."""
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not installed: .ci/run installs it (apt-get install shellcheck)")
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    return subprocess.run(["shellcheck", *map(str, paths)], cwd=cwd, capture_output=True, text=True)


def test_scripts_are_shellcheck_clean(tmp_path):
    result = shellcheck(*SCRIPTS)
    assert result.returncode == 0, result.stdout
    # planted: a copy of the scripts whose launcher gained one unquoted expansion fails the check
    shutil.copytree(REPO / "cluster", tmp_path / "cluster")
    copies = [tmp_path / p.relative_to(REPO) for p in SCRIPTS]
    assert shellcheck(*copies, cwd=tmp_path).returncode == 0
    launcher = tmp_path / "cluster/deepspeed/launch.sh"
    launcher.write_text(launcher.read_text() + "ls $HOSTFILE\n")
    assert "SC2086" in shellcheck(*copies, cwd=tmp_path).stdout


def torchrun_lines(output):
    return [shlex.split(line) for line in output.splitlines() if line.startswith("torchrun ")]


def test_train_sbatch_dry_run_torchrun():
    from torch.distributed.run import get_args_parser

    out = run(
        ["bash", "cluster/slurm/train.sbatch", "--config", CONFIG, "--dry-run", "optim.lr=1e-4"],
        slurm_env(),
    ).stdout
    srun = next(shlex.split(line) for line in out.splitlines() if line.startswith("srun "))
    assert "--ntasks-per-node=1" in srun
    assert srun[srun.index("--") + 1 :] == ["--resume", "auto", "--config", CONFIG, "optim.lr=1e-4"]
    per_node = [get_args_parser().parse_args(cmd[1:]) for cmd in torchrun_lines(out)]
    assert [a.node_rank for a in per_node] == list(range(len(HOSTS)))
    assert {(a.nnodes, a.nproc_per_node, a.master_addr, a.master_port) for a in per_node} == {
        ("5", "8", "gpu01", 20042)
    }
    assert per_node[0].training_script_args == ["--resume", "auto", "--config", CONFIG, "optim.lr=1e-4"]


def test_generated_training_arguments_parse_with_the_trainers_parser():
    from pretrain.train import parse_args

    args = parse_args(["--resume", "auto", "--config", "run.yaml", "optim.lr=1e-4"])
    assert (args.config, args.resume, args.overrides) == ("run.yaml", "auto", ["optim.lr=1e-4"])
    # the sbatch puts `--resume auto` first so that a user's own --resume wins
    assert parse_args(["--resume", "auto", "--config", "r.yaml", "--resume", "/ckpt/7"]).resume == "/ckpt/7"


def test_train_sbatch_dry_run_deepspeed_hostfile():
    from deepspeed.launcher.runner import parse_args

    out = run(
        ["bash", "cluster/slurm/train.sbatch", "--dry-run", "--config", CONFIG],
        slurm_env(LAUNCHER="deepspeed", SLURM_GPUS_ON_NODE="4"),
    ).stdout
    hostfile = [line.removeprefix("#   ") for line in out.splitlines() if line.startswith("#   ")]
    assert hostfile == [f"{h} slots=4" for h in HOSTS]
    cmd = next(shlex.split(line) for line in out.splitlines() if line.startswith("deepspeed "))
    args = parse_args(cmd[1:])
    assert (args.num_nodes, args.num_gpus, args.master_addr, args.master_port) == (5, 4, "gpu01", 20042)
    assert args.user_args == ["--resume", "auto", "--config", CONFIG]


def test_train_sbatch_header_requests_signal_and_requeue():
    header = [
        line.split()[1]
        for line in (REPO / "cluster/slurm/train.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH")
    ]
    assert "--requeue" in header and "--ntasks-per-node=1" in header
    assert any(opt.startswith("--signal=B:USR1@") for opt in header)
    assert any(opt.startswith("--output=logs/") and "%j" in opt for opt in header)


def test_deepspeed_wrapper_single_and_multi_node(tmp_path):
    env = slurm_env()
    del env["SLURM_JOB_NODELIST"]
    single = shlex.split(
        run(
            ["cluster/deepspeed/launch.sh", "--dry-run", "--gpus", "2", "--", "--config", "x.yaml"], env
        ).stdout
    )
    assert single[:3] == ["deepspeed", "--num_gpus", "2"] and single[-2:] == ["--config", "x.yaml"]

    hostfile = tmp_path / "hosts"
    hostfile.write_text("# comment\n\nnodeA slots=8\nnodeB slots=8\n")
    multi = shlex.split(
        run(
            [
                "cluster/deepspeed/launch.sh",
                "--dry-run",
                "--hostfile",
                str(hostfile),
                "--",
                "--config",
                "x.yaml",
            ],
            env,
        ).stdout
    )
    from deepspeed.launcher.runner import parse_args

    args = parse_args(multi[1:])
    assert (args.hostfile, args.master_addr) == (str(hostfile), "nodeA")

    missing = run(
        ["cluster/deepspeed/launch.sh", "--hostfile", str(tmp_path / "nope"), "--", "x"], env, check=False
    )
    assert missing.returncode == 2 and "hostfile not found" in missing.stderr


def test_example_hostfile_reads_with_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(REPO / "cluster/deepspeed/hostfile.example"))
    assert len(pool) >= 2 and set(pool.values()) == {8}


def test_ray_sbatch_dry_run():
    out = run(
        ["bash", "cluster/slurm/ray.sbatch", "--dry-run", "--", "cogvideo-prep", "--input", "/d"],
        slurm_env(SLURM_JOB_NODELIST="cpu[1-3]", SLURM_GPUS_ON_NODE=""),
    ).stdout.splitlines()
    srun_workers = shlex.split(next(line for line in out if "ray-worker" in line and line.startswith("srun")))
    assert "--ntasks=2" in srun_workers and "--exclude=cpu1" in srun_workers
    assert "ray start --head --port=6379" in out[1]
    assert any(line.startswith("ray start --address=cpu1:6379") for line in out)
    assert out[-1] == "ray job submit --address=http://cpu1:8265 -- cogvideo-prep --input /d"


def test_ray_submit_examples():
    out = run(
        [
            "cluster/ray/submit.sh",
            "--dry-run",
            "--address",
            "http://head:8265",
            "sample",
            "--",
            "--prompts",
            "/p.txt",
            "--out",
            "/o",
        ],
        slurm_env(),
    ).stdout
    cmd = shlex.split(out)
    assert cmd[:5] == ["ray", "job", "submit", "--address", "http://head:8265"]
    assert cmd[cmd.index("--") + 1 :] == [
        "~/cogvideo/.venv/bin/cogvideo-sample",
        "--ray",
        "--prompts",
        "/p.txt",
        "--out",
        "/o",
    ]
    prep = shlex.split(
        run(
            [
                "cluster/ray/submit.sh",
                "--dry-run",
                "--bin",
                "/venv/bin",
                "prep",
                "--",
                "--input",
                "/v",
                "--out",
                "/s",
            ],
            slurm_env(),
        ).stdout
    )
    assert prep[prep.index("--") + 1 :] == [
        "/venv/bin/cogvideo-prep",
        "--address",
        "auto",
        "--input",
        "/v",
        "--out",
        "/s",
    ]
    bad = run(["cluster/ray/submit.sh", "--dry-run", "train", "--", "x"], slurm_env(), check=False)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_ray_cluster_yaml_validates_with_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster/ray/cluster.yaml").read_text()))
    validate_config(config)
    assert (
        config["provider"]["type"] == "local"
        and len(config["provider"]["worker_ips"]) == config["max_workers"]
    )


def stub(path: Path, body: str):
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("sig", ["USR1", "TERM", None])
def test_signals_reach_the_launcher_and_usr1_requeues(tmp_path, sig):
    """train.sbatch with stand-in srun/scontrol. USR1 (time limit) reaches the launcher, then the
    job is requeued; TERM (preemption, scancel) reaches the launcher and nothing is requeued;
    without a signal the launcher's exit status is the job's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(
        bin_dir / "srun",
        'echo "$@" > "$STUB_DIR/srun.args"\n'
        "trap 'echo USR1 > \"$STUB_DIR/srun.signal\"; exit 0' USR1\n"
        "trap 'echo TERM > \"$STUB_DIR/srun.signal\"; exit 0' TERM\n"
        f"for _ in $(seq {100 if sig else 2}); do sleep 0.05; done\nexit 3\n",
    )
    stub(bin_dir / "scontrol", 'echo "$@" >> "$STUB_DIR/scontrol.calls"\n')
    env = slurm_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        STUB_DIR=str(tmp_path),
        SLURM_SUBMIT_DIR=str(REPO),
        LOG_DIR=str(tmp_path / "logs"),
    )
    proc = subprocess.Popen(
        ["bash", str(REPO / "cluster/slurm/train.sbatch"), "--config", "run.yaml"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun.args").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the script reach `wait`
    if sig:
        proc.send_signal(getattr(signal, f"SIG{sig}"))
    out, err = proc.communicate(timeout=30)
    assert (
        "cluster.slurm_env torchrun -- --resume auto --config run.yaml"
        in (tmp_path / "srun.args").read_text()
    )
    requeued = (
        (tmp_path / "scontrol.calls").read_text().split() if (tmp_path / "scontrol.calls").exists() else []
    )
    if sig:
        assert proc.returncode == 0, err
        assert (tmp_path / "srun.signal").read_text().strip() == sig
        assert requeued == (["requeue", "42"] if sig == "USR1" else [])
    else:
        assert proc.returncode == 3 and requeued == []


def test_bad_allocation_stops_the_script_with_the_reason():
    result = run(
        ["bash", "cluster/slurm/train.sbatch", "--dry-run", "--config", CONFIG],
        slurm_env(SLURM_JOB_NODELIST="gpu[4-1]"),
        check=False,
    )
    assert result.returncode != 0 and "runs backwards" in result.stderr


def test_train_sbatch_dry_run_checks_the_config_and_starts_nothing(tmp_path):
    """--dry-run anywhere among the script's arguments is a dry run (it once started the real job
    when it followed --config), and it validates the config for the allocation's world size."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\ntouch {tmp_path}/srun.called\n")
    (bin_dir / "srun").chmod(0o755)
    env = slurm_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    ok = run(["bash", "cluster/slurm/train.sbatch", "--config", CONFIG, "optim.lr=1e-4", "--dry-run"], env)
    assert "config valid for 40 ranks (TP 1 x DP 40)" in ok.stdout
    bad = run(
        ["bash", "cluster/slurm/train.sbatch", "--config", CONFIG, "--dry-run", "parallel.tensor_parallel=3"],
        env,
        check=False,
    )
    assert bad.returncode == 2 and "tensor_parallel=3" in bad.stderr
    assert "Traceback" not in bad.stderr and "would run" not in bad.stdout
    assert not (tmp_path / "srun.called").exists()
