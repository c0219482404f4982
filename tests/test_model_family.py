"""A second model family fits without touching the trainer's loop: a tiny non-autoregressive
masked-token video model (MaskGIT-style: bidirectional attention, a random share of frame tokens
replaced by a mask id, loss on those) registers its config, plain model, initialisation, TP plan,
loss and batch builder here, and trains through `pretrain.train.main` on shards the test writes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cogvideo.family import ModelFamily, build_model, family_of, get_family, register, resolve_model_section
from cogvideo.models.cogvideo.config import ModelConfig
from cogvideo.models.cogvideo.model import image_token_loss
from cogvideo.tp_plan import Column, Row, TiedEmbedding, TPPlan, Vocab

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class MaskedVideoConfig(ModelConfig):
    name: str = "masked-toy"
    min_mask_ratio: float = 0.2  # each sample masks a share of its frame tokens drawn in [min, 1]


class Block(nn.Module):
    def __init__(self, cfg: MaskedVideoConfig):
        super().__init__()
        size = cfg.hidden_size
        self.head_dim = cfg.head_dim
        self.norm1, self.norm2 = nn.LayerNorm(size), nn.LayerNorm(size)
        self.qkv, self.proj = nn.Linear(size, 3 * size), nn.Linear(size, size)
        self.fc1, self.fc2 = nn.Linear(size, cfg.ffn_size), nn.Linear(cfg.ffn_size, size)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(q, k, v)  # bidirectional: every token sees every token
        x = x + self.proj(ctx.transpose(1, 2).reshape(B, L, -1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class MaskedVideoModel(nn.Module):
    def __init__(self, cfg: MaskedVideoConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.word_embeddings = TiedEmbedding(cfg.vocab.vocab_size, cfg.hidden_size)
        self.positions = nn.Embedding(cfg.seq_length, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, tokens):
        x = self.word_embeddings(tokens) + self.positions.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.word_embeddings.unembed(self.norm(x))


def toy_init(cfg: MaskedVideoConfig, name: str, tensor: torch.Tensor) -> None:
    """normal(init_std) for matrices and tables, ones for norm weights, zeros for biases."""
    if name.endswith("bias"):
        nn.init.zeros_(tensor)
    elif tensor.dim() == 1:
        nn.init.ones_(tensor)
    else:
        nn.init.normal_(tensor, std=cfg.init_std)


PLAN = TPPlan(
    {"word_embeddings": Vocab(), "qkv": Column(stride=3), "proj": Row(), "fc1": Column(), "fc2": Row()},
    blocks="blocks",
)


def mask_tokens(cfg: MaskedVideoConfig, text_ids, frames, seed: int):
    """[left-padded text; all frames] with a seeded share of frame tokens replaced by the mask id."""
    text = torch.full((cfg.text_length,), cfg.vocab.pad_id, dtype=torch.long)
    text[cfg.text_length - len(text_ids) :] = torch.as_tensor(text_ids, dtype=torch.long)
    sequence = torch.cat([text, torch.as_tensor(frames, dtype=torch.long).flatten()])
    g = torch.Generator().manual_seed(seed % 2**63)
    ratio = cfg.min_mask_ratio + (1 - cfg.min_mask_ratio) * float(torch.rand((), generator=g))
    is_frame = torch.arange(len(sequence)) >= cfg.text_length
    loss_mask = is_frame & (torch.rand(len(sequence), generator=g) < ratio)
    tokens = sequence.masked_fill(loss_mask, cfg.vocab.boi_id)  # the image-start id serves as [MASK]
    return tokens, sequence.where(loss_mask, 0), loss_mask  # targets only where the loss is taken


def masked_example(cfg: MaskedVideoConfig, sample, text_ids, seed: int) -> dict:
    tokens, targets, loss_mask = mask_tokens(cfg, text_ids, sample.arrays["frames"], seed)
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


def masked_loss(cfg, model, batch, device):
    tokens, targets, mask = (batch.tensors[name].to(device) for name in ("tokens", "targets", "loss_mask"))
    return image_token_loss(cfg, model(tokens), targets, mask)


def toy_flops(cfg) -> float:
    per_layer = 4 * cfg.hidden_size**2 + 2 * cfg.hidden_size * cfg.ffn_size
    return 6 * cfg.seq_length * cfg.num_layers * per_layer


FAMILY = register(
    ModelFamily(
        name="masked-video",
        config=MaskedVideoConfig,
        presets={"masked-toy": MaskedVideoConfig},
        build_model=MaskedVideoModel,
        init_weights=toy_init,
        tp_plan=PLAN,
        loss=masked_loss,
        example=masked_example,
        train_flops=toy_flops,
    )
)


def test_the_model_section_picks_the_family_and_its_presets():
    cfg = resolve_model_section({"family": "masked-video", "preset": "masked-toy", "num_layers": 3})
    assert type(cfg) is MaskedVideoConfig and cfg.num_layers == 3
    assert family_of(cfg) is FAMILY and get_family("masked-video") is FAMILY
    assert type(resolve_model_section({"preset": "tiny"})).__name__ == "ModelConfig"  # cogvideo by default
    with pytest.raises(ValueError, match="model.family: unknown family 'nope'"):
        resolve_model_section({"family": "nope", "preset": "tiny"})
    with pytest.raises(ValueError, match=r"unknown preset 'tiny' \(family masked-video\)"):
        resolve_model_section({"family": "masked-video", "preset": "tiny"})


def test_a_cogvideo_process_imports_no_other_family_until_one_is_named():
    """GLOBER's and HPDM's modules import diffusers (~2 s at the start of every process: each
    training rank, each CLI call); the shipped families load when a config or preset names them."""
    probe = (
        "import sys, pretrain.train, cogvideo.checkpoint.cli, cogvideo.sampling.cli\n"
        "print(sorted(m for m in ('diffusers', 'cogvideo.models.glober', 'cogvideo.models.hpdm') if m in sys.modules))\n"
        "from cogvideo.family import any_preset\n"
        "print(type(any_preset('hpdm-demo')).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "HPDMConfig"]


def test_the_build_initialises_by_the_familys_own_init():
    cfg = MaskedVideoConfig()
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, MaskedVideoModel)
    norm = model.blocks[0].norm1
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    assert not model.blocks[1].fc1.bias.any()
    weight = model.blocks[1].fc1.weight  # 4 * hidden^2 draws: the sample std within 5 standard errors
    assert abs(float(weight.detach().std()) / cfg.init_std - 1) < 5 / math.sqrt(2 * weight.numel())


def test_the_toy_plan_shards_and_merges_its_own_state_dict():
    torch.manual_seed(0)
    full = build_model(MaskedVideoConfig()).state_dict()
    shards = [PLAN.shard_state_dict(full, rank, 2) for rank in range(2)]
    assert shards[0]["blocks.0.qkv.weight"].shape[0] == 3 * MaskedVideoConfig().hidden_size // 2
    assert shards[0]["blocks.0.proj.bias"].shape == full["blocks.0.proj.bias"].shape  # row bias whole
    merged = PLAN.merge_state_dicts(shards)
    assert all(torch.equal(merged[n], full[n]) for n in full)


def test_masking_is_reproducible_and_leaves_text_alone():
    cfg = MaskedVideoConfig()
    frames = torch.randint(
        0, cfg.vocab.num_image_tokens, (cfg.num_frames, cfg.frame_tokens, cfg.frame_tokens)
    )
    text_ids = [cfg.vocab.text_id(5), cfg.vocab.text_id(6)]
    tokens, targets, mask = mask_tokens(cfg, text_ids, frames, seed=7)
    again = mask_tokens(cfg, text_ids, frames, seed=7)
    assert all(torch.equal(a, b) for a, b in zip((tokens, targets, mask), again))
    assert not mask[: cfg.text_length].any() and mask.any()
    sequence = torch.cat([tokens[: cfg.text_length], frames.flatten()])
    assert torch.equal(tokens[~mask], sequence[~mask]) and (tokens[mask] == cfg.vocab.boi_id).all()
    assert torch.equal(targets[mask], sequence[mask]) and (targets[~mask] == 0).all()


def test_the_converter_splits_a_second_family_by_its_own_plan(tmp_path):
    """Written at TP 2, resharded to 1 and 4 (and padded to more vocabulary rows): every stored
    tensor is the toy plan's split of the original, written out by hand here (CogVideo's plan
    would keep `blocks.*.qkv` whole); config.json records the family and loads back as its config."""
    from cogvideo.checkpoint import CheckpointError, load_model_config, load_model_state, reshard
    from cogvideo.checkpoint.cli import describe
    from cogvideo.checkpoint.format import Checkpoint, save_model_checkpoint
    from cogvideo.checkpoint.sat import export_sat

    def by_hand(name: str, t: torch.Tensor, r: int, n: int) -> torch.Tensor:
        if name.endswith("qkv.weight") or name.endswith("qkv.bias"):
            return torch.cat([x.chunk(n)[r] for x in t.chunk(3)])
        if name.endswith(("fc1.weight", "fc1.bias")) or name == "word_embeddings.weight":
            return t.chunk(n)[r]
        return t.chunk(n, dim=1)[r] if name.endswith(("proj.weight", "fc2.weight")) else t

    torch.manual_seed(0)
    cfg = resolve_model_section({"family": "masked-video", "preset": "masked-toy", "min_mask_ratio": 0.3})
    full = {n: t + 0.1 * torch.randn_like(t) for n, t in build_model(cfg).state_dict().items()}
    src = save_model_checkpoint(tmp_path / "tp2", full, cfg, tensor_parallel=2)
    record = json.loads((src / "config.json").read_text())["model"]
    assert record["family"] == "masked-video" and record["min_mask_ratio"] == 0.3
    for tp in (1, 4):
        ckpt = Checkpoint(reshard(src, tmp_path / f"tp{tp}", tp))
        assert type(ckpt.cfg) is MaskedVideoConfig and ckpt.cfg == cfg and ckpt.plan is PLAN
        for rank in range(tp):
            for name, tensor in full.items():
                assert torch.equal(ckpt.readers[rank].get(name), by_hand(name, tensor, rank, tp)), (tp, name)
    assert (
        load_model_config(tmp_path / "tp4") == cfg and describe(tmp_path / "tp4")["family"] == "masked-video"
    )
    local = load_model_state(tmp_path / "tp4", 1, 2)
    assert all(torch.equal(local[n], by_hand(n, t, 1, 2)) for n, t in full.items())

    rows = cfg.vocab.vocab_size + 8
    padded = Checkpoint(reshard(src, tmp_path / "padded", 4, vocab_size=rows))
    table = padded.full("word_embeddings.weight")
    assert padded.cfg.vocab.vocab_size == rows and padded.cfg.min_mask_ratio == 0.3
    assert torch.equal(table[: cfg.vocab.vocab_size], full["word_embeddings.weight"]) and not table[-8:].any()
    with pytest.raises(CheckpointError, match="'masked-video' model; SwissArmyTransformer.*'cogvideo'"):
        export_sat(src, tmp_path / "sat")


def train_the_toy_family(root: Path, shards: list[str], tokenizer: str, steps: int) -> Path:
    """`steps` steps of the trainer's own entry point, with this family registered, on one rank;
    the run's checkpoint directory (the full model exported, the batches' keys logged)."""
    from test_pretrain_dist import torchrun

    launcher = root / "train_masked.py"
    launcher.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nimport test_model_family\n"
        "from pretrain.train import main\nmain()\n"
    )
    run = root / "run"
    args = [
        "--config",
        str(ROOT / "configs/tiny_test.yaml"),
        "model.family=masked-video",
        "model.preset=masked-toy",
        f"data.shards=[{','.join(shards)}]",
        f"data.text_tokenizer={tokenizer}",
        "data.max_cut_text=1",
        f"checkpoint.dir={run}",
        "checkpoint.export_full=true",
        f"training.max_steps={steps}",
        "logging.sample_keys=true",
    ]
    proc = torchrun(1, args, script=str(launcher))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run


def step_one_reference(shards: list[str], tokenizer: str) -> tuple[dict, list[str], float]:
    """Independent of the trainer: the initial weights from the config's seed, the first batch the
    loader builds, and the loss on it; returned as (initial state dict, the batch's keys, loss)."""
    from cogvideo.tokenizers.text import TextTokenizer
    from pretrain.config import load_train_config
    from pretrain.data import ShardLoader

    cfg = resolve_model_section({"family": "masked-video", "preset": "masked-toy", "train_backbone": True})
    train_cfg = load_train_config(
        str(ROOT / "configs/tiny_test.yaml"), [f"data.shards=[{','.join(shards)}]", "data.max_cut_text=1"]
    )
    training = train_cfg.training
    torch.manual_seed(training.seed)
    model = build_model(cfg)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    encode = TextTokenizer(tokenizer, cfg.vocab).encode
    loader = ShardLoader(
        shards, cfg, encode, train_cfg.data, micro_batch_size=training.micro_batch_size, seed=training.seed
    )
    batch = next(loader.batches())
    with torch.no_grad():
        return initial, batch.keys, float(masked_loss(cfg, model, batch, torch.device("cpu")))


@pytest.mark.slow
def test_a_second_family_trains_through_the_real_trainer(tmp_path):
    from test_pretrain_data import write_caption_tokenizer, write_shards

    shards, tokenizer, steps = write_shards(tmp_path), write_caption_tokenizer(tmp_path), 4
    run = train_the_toy_family(tmp_path, shards, tokenizer, steps)
    rows = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)

    initial, keys, reference = step_one_reference(shards, tokenizer)
    logged = json.loads((run / "logs/samples_rank0.jsonl").read_text().splitlines()[0])
    assert keys == logged["keys"]
    assert rows[0]["loss"] == pytest.approx(reference, rel=1e-5)

    final = torch.load(run / f"step{steps:08d}/model_full.pt", weights_only=True)
    assert set(final) == set(initial)  # the checkpoint holds the toy model, merged by its plan
    assert any(not torch.equal(final[n], initial[n]) for n in initial)
