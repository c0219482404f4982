"""Multi-process training (torchrun, gloo, CPU) against a plain single-process PyTorch loop.

Every run logs the sample keys of each micro-batch; the reference rebuilds each step's global
batch from those keys, trains the same initial weights with torch.optim.AdamW, a hand-written
warmup+cosine and clip_grad_norm_, and must match the run's losses and final weights (fp32).

Weight decay is set where it shows: over the 6 steps it moves a weight w by ~8e-3 * DECAY * w
(the summed learning rate), against the weights' tolerance of 0.05 lr = 1e-4 (tests/tolerances.py).
With DECAY = 1 that is 8e-3 on a LayerNorm gain, ~2e-3 on the initial weights' N(0, 0.1) biases
and gates and up to ~8e-4 on the largest 0.02-std matrix entries, so a trainer that skips decay, or
decays biases, norms or gates, fails the comparison (planted beside it on the reference side).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from process_helpers import trainer_command
from test_pretrain_data import write_caption_tokenizer, write_shards
from tolerances import FP32_EPS, adam_weight_atol, loss_rel_tol
from webdataset.tariterators import tarfile_samples

from cogvideo.checkpoint.digest import record_folder
from cogvideo.checkpoint.format import load_model_state, save_model_checkpoint
from cogvideo.checkpoint.training import write_complete
from cogvideo.family import build_model, plain_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.sequence import build_sequence
from cogvideo.precision import torch_dtype
from cogvideo.shards import decode_sample
from cogvideo.text_format import TextFormat
from cogvideo.tokenizers.text import TextTokenizer
from pretrain.launch import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# CLIP below every step's gradient norm (0.36-0.48 here): clipping acts on each step, so a wrong
# global norm (a shard counted twice, a rank's own norm) moves the weights
LR, WARMUP, MIN_RATIO, CLIP, DECAY = 2e-3, 2, 0.1, 0.25, 1.0
PORTS = iter(free_port, None)  # a fresh free port at each next()


def make_workspace(root: Path, codes: int | None = None) -> dict:
    """Shards (16 stage-1 samples in 4 shards; frames over the first `codes` image codes), a text
    tokenizer and initial weights."""
    shards = write_shards(root, codes=codes)
    tokenizer = write_caption_tokenizer(root)
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(train_backbone=True)
    model = build_model(cfg)
    with torch.no_grad():  # non-zero biases and gates: decay on them would show
        for name, p in model.named_parameters():
            if name.endswith(("bias", "temporal_gate")):
                p.normal_(std=0.1)
    save_model_checkpoint(root / "init", model.state_dict(), cfg)
    return {"root": root, "shards": shards, "tokenizer": str(tokenizer), "init": str(root / "init")}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train"))


def base_args(ws, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs/tiny_test.yaml"),
        f"data.shards=[{','.join(ws['shards'])}]",
        f"data.text_tokenizer={ws['tokenizer']}",
        "data.max_cut_text=1",  # the tiny preset keeps 8 text tokens; the reference cuts alike
        f"init.weights={ws['init']}",
        f"checkpoint.dir={run_dir}",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=2",
        "checkpoint.export_full=true",
        "logging.sample_keys=true",
        f"training.max_steps={STEPS}",
        f"optim.lr={LR}",
        f"optim.warmup_steps={WARMUP}",
        f"optim.min_lr_ratio={MIN_RATIO}",
        f"optim.grad_clip={CLIP}",
        f"optim.weight_decay={DECAY}",
        "parallel.precision=fp32",
        *extra,
    ]  # the reference trains in fp32; a later precision= wins


def torchrun(
    nproc: int, args: list[str], script: str | None = None, env: dict | None = None, timeout: int = 240
) -> subprocess.CompletedProcess:
    cmd, full_env = trainer_command(nproc, next(PORTS), script)
    full_env.update(env or {})
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env
    )


def train(ws, name: str, nproc: int, *extra: str) -> Path:
    run_dir = ws["root"] / name
    proc = torchrun(nproc, base_args(ws, run_dir, *extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir


def losses(run_dir: Path, metric: str = "loss") -> dict[int, float]:
    """`metric` (the loss by default) of each logged step."""
    out = {}
    for line in (run_dir / "logs/metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row[metric]
    return out


def key_log(run_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for f in sorted((run_dir / "logs").glob("samples_rank*.jsonl"))
        for line in f.read_text().splitlines()
    ]


def step_batches(run_dir: Path) -> dict[int, list[str]]:
    """Global batch per step: each DP rank's micro-batches once (TP peers carry the same)."""
    seen = {}
    for row in key_log(run_dir):
        seen[(row["step"], row["dp_rank"], row["micro"])] = row["keys"]
    batches = defaultdict(list)
    for (step, _, _), keys in sorted(seen.items()):
        batches[step] += keys
    return dict(batches)


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / f"step{STEPS:08d}/model_full.pt")


# ---- the independent reference ------------------------------------------------------------


def not_decayed(name: str) -> bool:
    """Biases, LayerNorm parameters and the temporal gates: AdamW leaves them undecayed."""
    return name.endswith("bias") or "layernorm" in name or name.endswith("temporal_gate")


def reference(ws, batches: dict[int, list[str]], train_backbone=True, flat_rule=not_decayed, lr=LR):
    """Losses and gradient norms (before clipping) per step, and the final weights;
    `flat_rule(name)`: no weight decay on that parameter."""
    cfg = get_preset("tiny").replace(train_backbone=train_backbone)
    samples = {}
    for url in ws["shards"]:
        for raw in tarfile_samples([{"url": url}]):
            sample = decode_sample(raw)
            samples[sample.key] = sample
    tok = TextTokenizer(ws["tokenizer"], cfg.vocab)

    def sequence(key):
        s = samples[key]
        ids = tok.encode(TextFormat().text(s.caption, s.meta.duration))[: cfg.text_length]
        return build_sequence(cfg, ids, s.arrays["frames"])

    model = build_model(cfg, init_weights=False)
    model.load_state_dict(load_model_state(ws["init"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = [p for n, p in named if flat_rule(n)]
    matrices = [p for n, p in named if not any(p is q for q in flat)]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": DECAY}, {"params": flat, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def factor(step):
        if step < WARMUP:
            return (step + 1) / WARMUP
        t = (step - WARMUP) / (STEPS - WARMUP)
        return MIN_RATIO + (1 - MIN_RATIO) * (1 + math.cos(math.pi * t)) / 2

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    out, norms = {}, {}
    for step in sorted(batches):
        tokens, targets, mask = (torch.stack(t) for t in zip(*(sequence(k) for k in batches[step])))
        loss = model.loss(model(tokens), targets, mask)
        loss.backward()
        norms[step] = torch.nn.utils.clip_grad_norm_([p for _, p in named], CLIP).item()
        opt.step()
        sched.step()
        opt.zero_grad()
        out[step] = loss.item()
    return out, norms, model.state_dict()


def assert_matches_reference(ws, run_dir: Path, train_backbone=True, flat_rule=not_decayed):
    batches = step_batches(run_dir)
    assert sorted(batches) == list(range(1, STEPS + 1))
    ref_losses, ref_norms, ref_weights = reference(ws, batches, train_backbone, flat_rule)
    got, got_norms = losses(run_dir), losses(run_dir, "grad_norm")
    rel = loss_rel_tol(get_preset("tiny").num_layers)  # bounds in tests/tolerances.py
    for step in ref_losses:
        assert got[step] == pytest.approx(ref_losses[step], rel=rel), f"step {step}"
        assert got_norms[step] == pytest.approx(ref_norms[step], rel=rel), f"step {step}: gradient norm"
        assert ref_norms[step] > CLIP  # clipped: the norm decides the update
    weights = final_weights(run_dir)
    assert set(weights) == set(ref_weights)
    for name, ref in ref_weights.items():
        torch.testing.assert_close(weights[name], ref, rtol=0, atol=adam_weight_atol(LR), msg=name)
    moved = load_model_state(ws["init"])
    assert any(not torch.equal(moved[n], ref_weights[n]) for n in ref_weights)  # training did change weights


def assert_data_split(run_dir: Path, dp: int, tp: int, epoch_steps: int):
    rows = key_log(run_dir)
    by_rank = defaultdict(dict)
    for row in rows:
        by_rank[(row["dp_rank"], row["tp_rank"])][(row["step"], row["micro"])] = row["keys"]
    assert len(by_rank) == dp * tp
    for d in range(dp):
        for t in range(1, tp):
            assert by_rank[(d, t)] == by_rank[(d, 0)], "TP peers must see identical batches"
    epoch = [
        [k for (step, _), keys in sorted(by_rank[(d, 0)].items()) if step <= epoch_steps for k in keys]
        for d in range(dp)
    ]
    everything = [k for keys in epoch for k in keys]
    assert len(everything) == len(set(everything)) == 16, "an epoch covers each stage-1 sample once"
    for a in range(dp):
        for b in range(a + 1, dp):
            assert not set(epoch[a]) & set(epoch[b])


# ---- parity ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero2_run(ws):
    return train(ws, "zero2", 2, "parallel.zero_stage=2", "model.train_backbone=true")


def test_zero2_dp2_matches_single_process(ws, zero2_run):
    assert_matches_reference(ws, zero2_run)
    assert_data_split(zero2_run, dp=2, tp=1, epoch_steps=4)  # 2 ranks x 2 samples x 4 steps = 16


@pytest.mark.parametrize(
    "flat_rule",
    [lambda name: True, lambda name: False],
    ids=["decay off", "decay on biases, norms and gates"],
)
def test_planted_decay_bugs_fail_the_parity_comparison(ws, zero2_run, flat_rule):
    """The comparison above against a reference whose decay is wrong in one of the ways a trainer
    could get it wrong: it must fail, so a trainer with that bug would fail it too."""
    with pytest.raises(AssertionError):
        assert_matches_reference(ws, zero2_run, flat_rule=flat_rule)


@pytest.mark.parametrize(
    "stage, extra",
    [
        (
            1,
            [
                "training.grad_accum_steps=2",
                "training.micro_batch_size=1",
                "model.activation_checkpointing=true",
                "parallel.offload_optimizer=true",
            ],
        ),
        (3, []),
    ],
)
def test_zero_stages_dp2_match_single_process(ws, stage, extra):
    run = train(ws, f"zero{stage}", 2, f"parallel.zero_stage={stage}", "model.train_backbone=true", *extra)
    assert_matches_reference(ws, run)


@pytest.fixture(scope="module")
def zero0_run(ws):
    """ZeRO-0 (the trainer's own clipping and NaN guard, pretrain.optim.GuardedAdamW) at TP=2 x DP=2."""
    return train(
        ws, "zero0", 4, "parallel.zero_stage=0", "parallel.tensor_parallel=2", "model.train_backbone=true"
    )


def test_zero0_tp2_dp2_matches_single_process(ws, zero0_run):
    assert_matches_reference(ws, zero0_run)
    assert_data_split(zero0_run, dp=2, tp=2, epoch_steps=4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero0_resumes_exactly(ws, zero0_run, precision):
    """Resumed from its step-4 checkpoint (DeepSpeed's files with the optimizer's own state: in
    bf16 its fp32 master weights too), a ZeRO-0 run ends bit for bit where the uninterrupted one
    does (fp32: the TP=2 x DP=2 run above; bf16: TP=2, run here)."""
    args = ("parallel.zero_stage=0", "parallel.tensor_parallel=2", "model.train_backbone=true")
    nproc, whole = 4, zero0_run
    if precision == "bf16":
        args, nproc = (*args, "parallel.precision=bf16", "training.micro_batch_size=4"), 2
        whole = train(ws, "zero0_bf16", nproc, *args)
    run = ws["root"] / f"zero0_{precision}_resumed"
    shutil.copytree(whole, run, ignore=shutil.ignore_patterns("step00000006"))
    (run / "latest").write_text("step00000004")
    proc = torchrun(nproc, base_args(ws, run, *args, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected, resumed = losses(whole), losses(run)
    assert [resumed[s] for s in range(1, STEPS + 1)] == [expected[s] for s in range(1, STEPS + 1)]
    a, b = final_weights(whole), final_weights(run)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_resume_at_another_zero_stage_is_refused_before_training(ws, zero0_run):
    """DeepSpeed's files differ between ZeRO stages: one line naming the stage written and how to
    go on, before any process group; the run's folder untouched."""
    before = sorted(p.name for p in zero0_run.rglob("*"))
    args = ("parallel.zero_stage=2", "parallel.tensor_parallel=2", "model.train_backbone=true")
    cmd, env = trainer_command(1, next(PORTS))  # the trainer's own launcher: its checks run once, here
    command = [*cmd, "--nproc-per-node", "4", *base_args(ws, zero0_run, *args, "--resume", "auto")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cogvideo-train:")]
    assert len(lines) == 1 and "written at ZeRO-0, this run would resume at ZeRO-2" in lines[0], lines
    assert "parallel.zero_stage=0" in lines[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in zero0_run.rglob("*")) == before


def test_tp2_matches_single_process(ws):
    run = train(
        ws, "tp2", 2, "parallel.tensor_parallel=2", "model.train_backbone=true", "training.micro_batch_size=4"
    )
    assert_matches_reference(ws, run)
    assert_data_split(run, dp=1, tp=2, epoch_steps=4)


def test_tp2_dp2_zero2_matches_single_process(ws):
    run = train(
        ws, "tp2dp2", 4, "parallel.tensor_parallel=2", "parallel.zero_stage=2", "model.train_backbone=true"
    )
    assert_matches_reference(ws, run)
    assert_data_split(run, dp=2, tp=2, epoch_steps=4)


# ---- faults: kill, preemption, NaN -----------------------------------------------------

INJECT = """
import os, signal, sys
import cogvideo.models.cogvideo as cogvideo_family
import pretrain.checkpoint as ckpt
import pretrain.train as train

mode, arg, rank = os.environ["INJECT"], os.environ["INJECT_ARG"], int(os.environ["RANK"])
if mode == "kill_in_save":  # SIGKILL rank 0 after DeepSpeed wrote step `arg`, before it is complete
    mark = ckpt.CheckpointManager._mark_complete
    def killed(self, path, record):
        if path.name == ckpt.tag_for(int(arg)):
            os.kill(os.getpid(), signal.SIGKILL)
        mark(self, path, record)
    ckpt.CheckpointManager._mark_complete = killed
elif mode == "sigterm":  # preemption notice reaching rank 1 only, after step `arg`
    step = train.Trainer.train_step
    def preempted(self):
        out = step(self)
        if self.step == int(arg) and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    train.Trainer.train_step = preempted
elif mode == "nan":  # NaN loss, hence NaN gradients, on the listed steps
    # the trainer's loss is the family's (cogvideo_family._train_loss -> image_token_loss)
    bad, poisoned = {int(s) for s in arg.split(",")}, [False]
    step, loss = train.Trainer.train_step, cogvideo_family.image_token_loss
    def poisoned_step(self):
        poisoned[0] = self.step + 1 in bad
        return step(self)
    def poisoned_loss(*args):
        value = loss(*args)
        return value * float("nan") if poisoned[0] else value
    train.Trainer.train_step = poisoned_step
    cogvideo_family.image_token_loss = poisoned_loss
elif mode == "zero_loss":  # zero loss, so zero gradients: AdamW moves the weights by decay alone
    loss = cogvideo_family.image_token_loss
    cogvideo_family.image_token_loss = lambda *args: loss(*args) * 0.0
train.main(sys.argv[1:])
"""


def run_injected(ws, run_dir: Path, nproc: int, mode: str, arg: str, *extra: str):
    script = ws["root"] / "inject.py"
    script.write_text(INJECT)
    return torchrun(
        nproc,
        base_args(ws, run_dir, *extra),
        script=str(script),
        env={"INJECT": mode, "INJECT_ARG": arg, "PYTHONPATH": str(ROOT)},
    )


def test_exact_resume_after_kill_and_preemption(ws, zero2_run):
    run = ws["root"] / "resume"
    same = ("parallel.zero_stage=2", "model.train_backbone=true", "--resume", "auto")
    killed = run_injected(ws, run, 2, "kill_in_save", "4", *same)
    assert killed.returncode != 0
    assert (run / "latest").read_text() == "step00000002"
    assert (run / "step00000004").is_dir() and not (run / "step00000004/COMPLETE").exists()

    preempted = run_injected(ws, run, 2, "sigterm", "3", *same)
    assert preempted.returncode == 0, preempted.stderr[-4000:]
    out = preempted.stdout + preempted.stderr
    assert "resumed from" in out and "step00000002" in out and "SIGTERM" in out
    assert (run / "latest").read_text() == "step00000003"

    finished = torchrun(2, base_args(ws, run, *same))
    assert finished.returncode == 0, finished.stderr[-4000:]
    rows = [json.loads(line)["step"] for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, STEPS + 1))  # one row per step: the replayed steps replaced theirs
    uninterrupted, resumed = losses(zero2_run), losses(run)
    assert [resumed[s] for s in range(1, STEPS + 1)] == [uninterrupted[s] for s in range(1, STEPS + 1)]
    assert step_batches(run) == step_batches(zero2_run)
    a, b = final_weights(zero2_run), final_weights(run)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert sorted(p.name for p in run.glob("step*")) == ["step00000004", "step00000006"]  # keep_last=2


def test_tp2_resume_with_dropout_continues_the_attention_dropout_stream(ws):
    """TP=2 with the release's dropout on: resumed from step 4, the run ends exactly where the
    uninterrupted one does, because the rank files keep each TP rank's model-parallel RNG state
    (attention dropout) beside torch's; resumed without that state, it does not."""
    args = (
        "parallel.tensor_parallel=2",
        "model.train_backbone=true",
        "model.hidden_dropout=0.1",
        "model.attention_dropout=0.1",
    )
    whole = train(ws, "tp2_dropout", 2, *args)
    final = {}
    for name, keep_state in (("tp2_dropout_resumed", True), ("tp2_dropout_reseeded", False)):
        run = ws["root"] / name
        shutil.copytree(whole, run, ignore=shutil.ignore_patterns("step00000006"))
        (run / "latest").write_text("step00000004")
        for file in (run / "step00000004").glob("rng_rank*.pt"):
            state = torch.load(file, weights_only=True)
            assert set(state["model_parallel"]["cpu"]) == {"model-parallel-rng"}
            if not keep_state:
                del state["model_parallel"]
                torch.save(state, file)
        write_complete(run / "step00000004", record_folder(run / "step00000004", exclude=["COMPLETE"]))
        proc = torchrun(2, base_args(ws, run, *args, "--resume", "auto"))
        assert proc.returncode == 0, proc.stderr[-4000:]
        final[name] = (losses(run), final_weights(run))
    expected, weights = losses(whole), final_weights(whole)
    resumed, resumed_weights = final["tp2_dropout_resumed"]
    assert [resumed[s] for s in range(1, STEPS + 1)] == [expected[s] for s in range(1, STEPS + 1)]
    assert all(torch.equal(weights[n], resumed_weights[n]) for n in weights)
    reseeded, _ = final["tp2_dropout_reseeded"]
    assert reseeded[5] != expected[5]  # the same batch and weights: only the attention masks differ


@pytest.mark.parametrize(
    "precision, zero_stage",
    [("bf16", 2), ("fp32", 0), ("bf16", 0)],  # DeepSpeed's ZeRO guard; the trainer's (GuardedAdamW)
    ids=["bf16-zero2", "fp32-zero0", "bf16-zero0"],
)
def test_nonfinite_steps_are_skipped_then_training_stops(ws, precision, zero_stage):
    run = ws["root"] / f"nan_{precision}_{zero_stage}"
    proc = run_injected(
        ws,
        run,
        1,
        "nan",
        "2,4,5,6",
        "training.max_nonfinite_steps=3",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=10",
        f"parallel.precision={precision}",
        f"parallel.zero_stage={zero_stage}",
    )
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "stopping at step 6: 3 steps in a row" in proc.stderr
    rows = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 1, 0, 1, 1, 1]
    weights = {s: torch.load(run / f"step{s:08d}/model_full.pt") for s in range(1, 6)}
    for name in weights[1]:
        assert torch.equal(weights[1][name], weights[2][name]), name  # skipped: no update
        assert torch.equal(weights[3][name], weights[5][name]), name
    # the tiny preset freezes the backbone: only the video parts ever move
    start = {k: v.to(torch_dtype(precision)).float() for k, v in load_model_state(ws["init"]).items()}
    for name, value in weights[3].items():
        video_part = "temporal" in name or name.startswith("frame_position")
        assert torch.equal(value, start[name]) != video_part, name


# ---- which tensors the optimizer decays --------------------------------------------------


def matrix_weights(cfg) -> set[str]:
    """The weights of the model's Linear and Embedding modules (read from the modules, not from the
    trainer's name rule): the tensors AdamW's weight decay is meant for."""
    return {
        f"{name}.weight"
        for name, module in plain_model(cfg).named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
    }


def assert_decay_only_on(decayed: set[str], before: dict, after: dict, lr_decay: float) -> None:
    """After one AdamW step on zero gradients: w (1 - lr wd) for `decayed`, unchanged elsewhere."""
    assert set(after) == set(before)
    for name, weight in before.items():
        if name in decayed:
            expected = weight * (1 - lr_decay)
            torch.testing.assert_close(after[name], expected, rtol=4 * FP32_EPS, atol=0, msg=name)
        else:
            assert torch.equal(after[name], weight), name


def test_the_optimizer_decays_exactly_the_weight_matrices(ws):
    """One step of the trainer's own optimizer (DeepSpeed, its param groups) on a zero loss."""
    run = ws["root"] / "decay"
    proc = run_injected(
        ws,
        run,
        1,
        "zero_loss",
        "",
        "model.train_backbone=true",
        "training.max_steps=1",
        "optim.warmup_steps=0",  # the first step at the full lr
        "logging.sample_keys=false",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = get_preset("tiny").replace(train_backbone=True)
    before = load_model_state(ws["init"])
    decayed = matrix_weights(cfg)
    assert decayed and decayed < set(before)
    assert_decay_only_on(decayed, before, torch.load(run / "step00000001/model_full.pt"), LR * DECAY)


@pytest.mark.parametrize("bug", ["decay off", "decay on everything"])
def test_planted_param_group_bugs_fail_the_decay_check(ws, bug, monkeypatch):
    """The trainer's param_groups with a planted bug, stepped as the trainer's AdamW would be."""
    import pretrain.optim

    cfg = get_preset("tiny").replace(train_backbone=True)
    model = build_model(cfg, init_weights=False)
    before = load_model_state(ws["init"])
    model.load_state_dict(before)
    if bug == "decay on everything":
        monkeypatch.setattr(pretrain.optim, "no_weight_decay", lambda name, param: False)
    groups = pretrain.optim.param_groups(model, 0.0 if bug == "decay off" else DECAY)
    optimizer = torch.optim.AdamW(groups, lr=LR)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    with pytest.raises(AssertionError):
        assert_decay_only_on(matrix_weights(cfg), before, model.state_dict(), LR * DECAY)


def test_tensorboard_gets_the_scalars(zero2_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(zero2_run / "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
