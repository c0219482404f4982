"""SLURM allocation -> hostfile, ranks, rendezvous and the exact launch commands.

The scripts in ``cluster/`` call this module instead of parsing SLURM variables in bash,
so every rule is tested and ``--dry-run`` prints what would run for a given allocation::

    python -m cluster.slurm_env env                      # MASTER_ADDR=... lines for `eval`
    python -m cluster.slurm_env hostfile --out hostfile  # DeepSpeed/MPI hostfile
    python -m cluster.slurm_env ranks                    # host, node rank, local rank, rank
    python -m cluster.slurm_env torchrun [--dry-run [--all-nodes]] -- --config run.yaml
    python -m cluster.slurm_env deepspeed --hostfile H [--dry-run] -- --config run.yaml
    python -m cluster.slurm_env ray-head | ray-worker [--dry-run]
    python -m cluster.slurm_env ray-submit [--dry-run] -- cogvideo-prep --input ...

Without ``--dry-run`` the launch subcommands replace this process (``os.execvp``), so
signals from SLURM reach the launcher directly; torchrun runs in this process instead
(``pretrain.launch.run_torchrun``): it hands every stop signal on to the workers, waits for them
to save, and ends with their exit status rather than its SignalException traceback.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pretrain.launch import FORWARDED_SIGNALS, LAUNCHER_VAR, run_torchrun

TRAIN_MODULE = "pretrain.train"
PORT_BASE = 20000  # MASTER_PORT = PORT_BASE + job id % PORT_SPAN unless MASTER_PORT is set
PORT_SPAN = 10000
RAY_PORT = 6379
RAY_DASHBOARD_PORT = 8265


class SlurmEnvError(ValueError):
    pass


# ---- host lists ------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: "a[1-2],b3" -> ["a[1-2]", "b3"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise SlurmEnvError(f"nodelist {text!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"nodelist {text!r}: unmatched ']' at position {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SlurmEnvError(f"nodelist {text!r}: unclosed '['")
    parts.append(text[start:])
    return parts


def _expand_ranges(body: str, where: str) -> list[str]:
    """ "01-04,07" -> ["01", "02", "03", "04", "07"]; a range keeps the width of its start."""
    values = []
    for item in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise SlurmEnvError(f"nodelist {where!r}: bad range {item!r} (expected N or N-M)")
        first, last = match.group(1), match.group(2)
        if last is None:
            values.append(first)
            continue
        if int(last) < int(first):
            raise SlurmEnvError(f"nodelist {where!r}: range {item!r} runs backwards")
        values.extend(str(n).zfill(len(first)) for n in range(int(first), int(last) + 1))
    return values


def _expand_pattern(pattern: str) -> list[str]:
    pieces: list[list[str]] = []
    pos = 0
    for match in re.finditer(r"\[([^\[\]]*)\]", pattern):
        pieces.append([pattern[pos : match.start()]])
        pieces.append(_expand_ranges(match.group(1), pattern))
        pos = match.end()
    pieces.append([pattern[pos:]])
    return ["".join(combo) for combo in itertools.product(*pieces)]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, in order: "gpu[01-04,07]" -> gpu01..gpu04, gpu07;
    "a[1-2],b3" -> a1, a2, b3; several bracket groups multiply ("r[1-2]n[1-2]")."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        if not part.strip():
            raise SlurmEnvError(f"nodelist {nodelist!r}: empty host name")
        hosts.extend(_expand_pattern(part.strip()))
    duplicates = sorted({h for h in hosts if hosts.count(h) > 1})
    if duplicates:
        raise SlurmEnvError(f"nodelist {nodelist!r}: hosts listed twice: {duplicates}")
    return hosts


# ---- the allocation --------------------------------------------------------------------
def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    value = env.get(name, "")
    if not value:
        return default
    if not value.strip().isdigit():
        raise SlurmEnvError(f"{name}={value!r}: expected a non-negative integer")
    return int(value)


def _gpus_from_env(env: Mapping[str, str]) -> int | None:
    """SLURM_GPUS_ON_NODE ("8"), else SLURM_GPUS_PER_NODE ("8", "a100:8", "gpu:a100:8")."""
    if env.get("SLURM_GPUS_ON_NODE"):
        value, name = env["SLURM_GPUS_ON_NODE"], "SLURM_GPUS_ON_NODE"
    elif env.get("SLURM_GPUS_PER_NODE"):
        value, name = env["SLURM_GPUS_PER_NODE"].rsplit(":", 1)[-1], "SLURM_GPUS_PER_NODE"
    else:
        return None
    if not value.isdigit():
        raise SlurmEnvError(f"{name}={env[name]!r}: expected a GPU count like 8 or a100:8")
    return int(value)


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: tuple[str, ...]
    gpus_per_node: int | None  # None: unknown (CPU-only Ray jobs may not need it)
    master_port: int
    node_rank: int = 0  # SLURM_NODEID of the calling task; the batch script runs on node 0

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def master_addr(self) -> str:
        return self.nodes[0]

    @property
    def gpus(self) -> int:
        if not self.gpus_per_node:
            raise SlurmEnvError(
                "GPUs per node unknown: submit with --gpus-per-node=N "
                "(sets SLURM_GPUS_ON_NODE) or pass --gpus-per-node N"
            )
        return self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, gpus_per_node: int | None = None) -> "Allocation":
        env = os.environ if env is None else env
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise SlurmEnvError(
                "SLURM_JOB_NODELIST is not set: run inside an allocation "
                "(sbatch/salloc) or export fake SLURM_* variables for a dry run"
            )
        job_id = env.get("SLURM_JOB_ID", "")
        if not job_id.isdigit():
            raise SlurmEnvError(f"SLURM_JOB_ID={job_id!r}: expected the numeric job id")
        nodes = tuple(expand_nodelist(nodelist))
        declared = _int_var(env, "SLURM_JOB_NUM_NODES") or _int_var(env, "SLURM_NNODES")
        if declared and declared != len(nodes):
            raise SlurmEnvError(
                f"SLURM_JOB_NUM_NODES={declared} but SLURM_JOB_NODELIST={nodelist!r} "
                f"expands to {len(nodes)} hosts"
            )
        gpus = gpus_per_node if gpus_per_node is not None else _gpus_from_env(env)
        if gpus is not None and gpus < 1:
            raise SlurmEnvError(f"GPUs per node must be >= 1, got {gpus}")
        node_rank = _int_var(env, "SLURM_NODEID", 0)
        if not 0 <= node_rank < len(nodes):
            raise SlurmEnvError(f"SLURM_NODEID={node_rank} outside the {len(nodes)} allocated nodes")
        port = _int_var(env, "MASTER_PORT", PORT_BASE + int(job_id) % PORT_SPAN)
        if not 1024 <= port <= 65535:
            raise SlurmEnvError(f"MASTER_PORT={port}: expected 1024..65535")
        return cls(job_id=job_id, nodes=nodes, gpus_per_node=gpus, master_port=port, node_rank=node_rank)


@dataclass(frozen=True)
class Rank:
    host: str
    node_rank: int
    local_rank: int
    rank: int


def ranks(alloc: Allocation) -> list[Rank]:
    """Global rank = node rank * GPUs per node + local rank (torchrun's static rendezvous)."""
    return [
        Rank(host, n, local, n * alloc.gpus + local)
        for n, host in enumerate(alloc.nodes)
        for local in range(alloc.gpus)
    ]


def hostfile(alloc: Allocation) -> str:
    return "".join(f"{host} slots={alloc.gpus}\n" for host in alloc.nodes)


def exports(alloc: Allocation) -> dict[str, str]:
    values = {
        "MASTER_ADDR": alloc.master_addr,
        "MASTER_PORT": str(alloc.master_port),
        "NNODES": str(alloc.num_nodes),
        "NODE_RANK": str(alloc.node_rank),
        "RAY_HEAD": alloc.master_addr,
    }
    if alloc.gpus_per_node:
        values.update(GPUS_PER_NODE=str(alloc.gpus), WORLD_SIZE=str(alloc.world_size))
    return values


# ---- commands --------------------------------------------------------------------------
def torchrun_command(
    alloc: Allocation, train_args: list[str], node_rank: int | None = None, shutdown_timeout: int = 300
) -> list[str]:
    """Static rendezvous on node 0, so ranks follow SLURM_NODEID (see :func:`ranks`)."""
    node_rank = alloc.node_rank if node_rank is None else node_rank
    return [
        "torchrun",
        f"--nnodes={alloc.num_nodes}",
        f"--nproc-per-node={alloc.gpus}",
        f"--node-rank={node_rank}",
        f"--master-addr={alloc.master_addr}",
        f"--master-port={alloc.master_port}",
        "--max-restarts=0",
        f"--signals-to-handle={FORWARDED_SIGNALS}",
        f"--shutdown-timeout={shutdown_timeout}",
        "-m",
        TRAIN_MODULE,
        *train_args,
    ]


def deepspeed_command(alloc: Allocation, hostfile_path: str, train_args: list[str]) -> list[str]:
    """The DeepSpeed runner on node 0 reaches the other hosts of the hostfile over pdsh/ssh."""
    return [
        "deepspeed",
        f"--hostfile={hostfile_path}",
        f"--num_nodes={alloc.num_nodes}",
        f"--num_gpus={alloc.gpus}",
        f"--master_addr={alloc.master_addr}",
        f"--master_port={alloc.master_port}",
        "--module",
        TRAIN_MODULE,
        *train_args,
    ]


def ray_head_command(alloc: Allocation) -> list[str]:
    gpus = [f"--num-gpus={alloc.gpus_per_node}"] if alloc.gpus_per_node else []
    return [
        "ray",
        "start",
        "--head",
        f"--port={RAY_PORT}",
        "--dashboard-host=0.0.0.0",
        f"--dashboard-port={RAY_DASHBOARD_PORT}",
        *gpus,
        "--block",
    ]


def ray_worker_command(alloc: Allocation) -> list[str]:
    gpus = [f"--num-gpus={alloc.gpus_per_node}"] if alloc.gpus_per_node else []
    return ["ray", "start", f"--address={alloc.master_addr}:{RAY_PORT}", *gpus, "--block"]


def ray_submit_command(alloc: Allocation, entrypoint: list[str]) -> list[str]:
    if not entrypoint:
        raise SlurmEnvError("ray-submit: give the job command after '--', e.g. -- cogvideo-prep --input ...")
    return [
        "ray",
        "job",
        "submit",
        f"--address=http://{alloc.master_addr}:{RAY_DASHBOARD_PORT}",
        "--",
        *entrypoint,
    ]


# ---- command line ----------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.slurm_env",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=None, help="override SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="shell assignments (MASTER_ADDR, MASTER_PORT, ...) for eval")
    sub.add_parser("ranks", help="host, node rank, local rank, global rank per process")
    p = sub.add_parser("hostfile", help="DeepSpeed hostfile: '<host> slots=<gpus>' per node")
    p.add_argument("--out", help="write here instead of stdout")

    def launcher(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
        return p

    p = launcher("torchrun", "torchrun for this node (SLURM_NODEID)")
    p.add_argument("--all-nodes", action="store_true", help="with --dry-run: print every node's command")
    p.add_argument(
        "--shutdown-timeout",
        type=int,
        default=300,
        help="seconds the workers get to checkpoint after a signal before SIGKILL",
    )
    p = launcher("deepspeed", "write the hostfile, then run the DeepSpeed runner")
    p.add_argument("--hostfile", required=True)
    launcher("ray-head", "ray start --head on this node")
    launcher("ray-worker", "ray start joining the head on node 0")
    launcher("ray-submit", "ray job submit of the command after '--' to the head's dashboard")
    return parser


def _run(argv: list[str], dry_run: bool) -> None:
    if dry_run:
        print(shlex.join(argv))
        return
    sys.stdout.flush()
    if argv[0] == "torchrun":
        os.environ[LAUNCHER_VAR] = "python -m cluster.slurm_env torchrun --"
        sys.exit(run_torchrun(argv[1:]))
    os.execvp(argv[0], argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    try:
        alloc = Allocation.from_env(gpus_per_node=args.gpus_per_node)
        if args.command == "env":
            print("\n".join(f"{k}={shlex.quote(v)}" for k, v in exports(alloc).items()))
        elif args.command == "ranks":
            for r in ranks(alloc):
                print(f"{r.host} node_rank={r.node_rank} local_rank={r.local_rank} rank={r.rank}")
        elif args.command == "hostfile":
            if args.out:
                Path(args.out).write_text(hostfile(alloc))
            else:
                print(hostfile(alloc), end="")
        elif args.command == "torchrun":
            if args.dry_run and args.all_nodes:
                for node, host in enumerate(alloc.nodes):
                    print(f"# node {node} ({host})")
                    print(shlex.join(torchrun_command(alloc, passthrough, node, args.shutdown_timeout)))
            else:
                _run(
                    torchrun_command(alloc, passthrough, shutdown_timeout=args.shutdown_timeout), args.dry_run
                )
        elif args.command == "deepspeed":
            if args.dry_run:
                print(f"# {args.hostfile}:")
                print("".join(f"#   {line}\n" for line in hostfile(alloc).splitlines()), end="")
            else:
                Path(args.hostfile).write_text(hostfile(alloc))
            _run(deepspeed_command(alloc, args.hostfile, passthrough), args.dry_run)
        elif args.command == "ray-head":
            _run(ray_head_command(alloc), args.dry_run)
        elif args.command == "ray-worker":
            _run(ray_worker_command(alloc), args.dry_run)
        elif args.command == "ray-submit":
            _run(ray_submit_command(alloc, passthrough), args.dry_run)
    except SlurmEnvError as err:
        sys.exit(f"cluster.slurm_env: {err}")


if __name__ == "__main__":
    main()
