"""The independent reference for tests/test_parity_sat.py, run in its own processes:
SwissArmyTransformer 0.2.9 builds CogView2 as its BaseModel (sandwich layernorm, as the release
trains it in CogView2's pretrain_coglm.py) at tiny width with random weights, at each tensor-
parallel degree of the spec in turn (its own model-parallel initialisation, `mpu`, over gloo:
its parallel layers hold their shards), runs its forward with the release's text-to-image masks
and position ids in float32 and float64 (logits gathered over the model-parallel group), and
saves the model with SAT's own save_checkpoint (through a DeepSpeed engine, as SAT always does),
RNG state included: one mp_rank_XX file per model-parallel rank.

    torchrun --nproc-per-node 4 tests/sat_reference.py SPEC.json OUT_DIR   # TP 1, 2 and 4
    python tests/sat_reference.py SPEC.json OUT_DIR                        # TP 1 only

SPEC: num_layers, hidden_size, num_heads, vocab_size, max_sequence_length, text_length,
image_position_offset, frame_tokens, pad_id, boi_id, text_ids [[...], ...] (each left-padded
here), image_codes [[...], ...], tensor_parallel [degrees] (default [1]; each divides the
world size). OUT_DIR gets inputs.pt and, per degree TP, sat_tpTP/ (the checkpoint) and
logits_tpTP.pt.
"""

import argparse
import json
import os
import sys
import types
import zlib
from pathlib import Path

import torch

# SAT's data utilities import HF `datasets` at import time; nothing here reads a dataset.
sys.modules.setdefault("datasets", types.ModuleType("datasets"))
sys.modules["datasets"].load_dataset = None

import deepspeed  # noqa: E402
from SwissArmyTransformer import mpu  # noqa: E402
from SwissArmyTransformer.model.base_model import BaseModel  # noqa: E402
from SwissArmyTransformer.training.model_io import save_checkpoint  # noqa: E402


def release_inputs(spec: dict):
    """Tokens, position ids and masks as CogView2's text-to-image generation builds them
    (pretrain_coglm.py make_text_image_generation; CogVideo's get_masks_and_position_ids_video):
    text left-padded to text_length, then [BOI, code 0 .. code n-2]. Every query sees the
    non-pad text; image queries see earlier image tokens; real text tokens take position ids
    0..n-1, pads 0; image tokens image_position_offset + i."""
    T, n = spec["text_length"], spec["frame_tokens"] ** 2
    rows, positions, masks = [], [], []
    for text, codes in zip(spec["text_ids"], spec["image_codes"]):
        pads = T - len(text)
        rows.append([spec["pad_id"]] * pads + text + [spec["boi_id"]] + codes[: n - 1])
        pos = torch.zeros(T + n, dtype=torch.long)
        pos[pads:T] = torch.arange(len(text))
        pos[T:] = spec["image_position_offset"] + torch.arange(n)
        positions.append(pos)
        mask = torch.zeros(T + n, T + n)
        mask[:, pads:T] = 1
        mask[T:, T:] = torch.ones(n, n).tril()
        masks.append(mask)
    return torch.tensor(rows), torch.stack(positions), torch.stack(masks).unsqueeze(1)


def sat_args(spec: dict, save: Path, tensor_parallel: int = 1) -> argparse.Namespace:
    """What BaseModel and save_checkpoint read; dropout as SAT's defaults (the forward is in
    eval mode, so they do not act)."""
    return argparse.Namespace(
        num_layers=spec["num_layers"],
        hidden_size=spec["hidden_size"],
        num_attention_heads=spec["num_heads"],
        vocab_size=spec["vocab_size"],
        max_sequence_length=spec["max_sequence_length"],
        hidden_dropout=0.1,
        attention_dropout=0.1,
        inner_hidden_size=None,
        hidden_size_per_attention_head=None,
        checkpoint_activations=False,
        checkpoint_num_layers=1,
        layernorm_order="sandwich",
        skip_init=False,
        use_gpu_initialization=False,
        deepspeed=True,
        save=str(save),
        no_save_rng=False,
        tokenizer_type="icetk",
        model_parallel_size=tensor_parallel,
    )


def randomise(model: torch.nn.Module, seed: int, rank: int = 0) -> None:
    """Weights far from SAT's init (norm gains around 1, everything else N(0, 0.2)), each tensor
    from its own generator: replicated ones alike on every model-parallel rank, the shards SAT's
    parallel layers hold (marked `model_parallel`) different on each."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = (
                zlib.crc32(name.encode())
                + 1000003 * seed
                + (7919 * rank if getattr(p, "model_parallel", False) else 0)
            )
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(key)) * 0.2
            p.copy_(1 + noise if "layernorm" in name and name.endswith("weight") else noise)


def run_degree(spec: dict, out: Path, tp: int) -> None:
    """SAT's model at TP=tp on every rank of the world (TP groups x data-parallel copies): logits
    gathered over the TP group (rank 0 saves them), and save_checkpoint from each TP group's first
    data-parallel copy."""
    mpu.initialize_model_parallel(tp)
    args = sat_args(spec, out / f"sat_tp{tp}", tp)
    torch.manual_seed(spec.get("seed", 0))
    model = BaseModel(args, parallel_output=False)  # logits gathered over the model-parallel group
    randomise(model, spec.get("seed", 0), mpu.get_model_parallel_rank())
    model.eval()
    tokens, position_ids, mask = release_inputs(spec)
    logits = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            logits[str(dtype)] = model.to(dtype)(tokens, position_ids, mask.to(dtype))[0].clone()
    model.to(torch.float32)
    if torch.distributed.get_rank() == 0:
        torch.save({"tokens": tokens, "position_ids": position_ids, "mask": mask}, out / "inputs.pt")
        torch.save(logits, out / f"logits_tp{tp}.pt")
    engine, *_ = deepspeed.initialize(
        model=model, mpu=mpu, config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}
    )
    save_checkpoint(1000, engine, None, None, args)
    mpu.destroy_model_parallel()


def main() -> None:
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, default)  # what a launcher sets for DeepSpeed; alone: a world of one
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init = "env://" if "MASTER_ADDR" in os.environ else f"file://{out / 'pg'}"
    torch.distributed.init_process_group("gloo", init_method=init, world_size=world, rank=rank)
    # SAT saves torch.cuda.get_rng_state() too; there is no GPU here, so the CPU generator's
    # state (the same kind of ByteTensor) stands in for it.
    torch.cuda.get_rng_state = torch.get_rng_state
    for tp in spec.get("tensor_parallel", [1]):
        run_degree(spec, out, tp)
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
