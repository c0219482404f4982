"""The independent reference for tests/test_parity_dsr.py, run in its own process:
SwissArmyTransformer 0.2.9 builds the released DSR model at tiny width with random weights and
saves it with SAT's own save_checkpoint (through a DeepSpeed engine, RNG state included).

    python tests/sat_dsr_reference.py SPEC.json OUT_DIR

The model class: the release's `DsrModel`, loaded from `sr_pipeline/dsr_model.py` of a checkout
of THUDM/CogView2 (or THUDM/CogVideo, branch CogVideo) named by the spec's `release_source`;
its CUDA local-attention kernels replaced by tests/local_attention_shim.py. Then its forward runs
on the release's inputs (`filling_sequence_dsr`'s tokens, mask and position ids) in float32 and
float64. Without `release_source`, SAT 0.2.9's own `Cuda2dModel` (the same two mixins, so the same
checkpoint layout) only writes the checkpoint, and no logits are computed.

SPEC: num_layers, hidden_size, num_heads, vocab_size, max_sequence_length, text_length,
low_side, high_side, low_position_offset, boi_id, seed, prompts [[text ids], ...] (each padded
here with the release's 0), low_codes [[...], ...], release_source (optional).
OUT_DIR gets sat/ (the checkpoint), inputs.pt and, with the release, logits.pt.
"""

import argparse
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import torch

# SAT's data utilities import HF `datasets` at import time; nothing here reads a dataset.
sys.modules.setdefault("datasets", types.ModuleType("datasets"))
sys.modules["datasets"].load_dataset = None
sys.path.insert(0, str(Path(__file__).parent))

import deepspeed  # noqa: E402
import local_attention_shim  # noqa: E402
from sat_reference import randomise, sat_args  # noqa: E402
from SwissArmyTransformer import mpu  # noqa: E402
from SwissArmyTransformer.model.official.cuda2d_model import Cuda2dModel  # noqa: E402
from SwissArmyTransformer.training.model_io import save_checkpoint  # noqa: E402


def release_model_class(source: str):
    path = Path(source) / "sr_pipeline" / "dsr_model.py"
    spec = importlib.util.spec_from_file_location("release_dsr_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DsrModel


def dsr_args(spec: dict, save: Path) -> argparse.Namespace:
    """sat_args plus what the DSR mixins read, as DirectSuperResolution sets them."""
    T, n, N = spec["text_length"], spec["low_side"] ** 2, spec["high_side"] ** 2
    args = sat_args(spec, save)
    args.new_sequence_length = spec["max_sequence_length"] + N
    args.layout = [T, T + n, T + n + N]
    args.kernel_size = args.kernel_size2 = 5
    return args


def release_inputs(spec: dict, text: list[int], low: list[int]):
    """filling_sequence_dsr's tokens (without the last slot), mask and position ids for one
    prompt, its 513 and 1024 written as the spec's low-res offset and max_sequence_length."""
    T, n, N = spec["text_length"], spec["low_side"] ** 2, spec["high_side"] ** 2
    n_pad = T - len(text)
    tokens = torch.tensor([0] * n_pad + text + low + [spec["boi_id"]] * N)[None]
    mask = torch.ones(T + n, T + n)
    mask[:T, T:] = 0
    mask[n_pad:, :n_pad] = 0
    offset, table = spec["low_position_offset"], spec["max_sequence_length"]
    position_ids = torch.cat(
        [
            torch.zeros(n_pad, dtype=torch.long),
            torch.arange(T - n_pad),
            torch.arange(offset, offset + n),
            torch.arange(table, table + N),
        ]
    )
    return tokens, mask, position_ids[None]


def main() -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.distributed.init_process_group("gloo", init_method=f"file://{out / 'pg'}", world_size=1, rank=0)
    mpu.initialize_model_parallel(1)
    local_attention_shim.install()
    args = dsr_args(spec, out / "sat")
    torch.manual_seed(spec["seed"])
    release = spec.get("release_source")
    model = (release_model_class(release) if release else Cuda2dModel)(args)
    randomise(model, spec["seed"])
    model.eval()
    inputs = [release_inputs(spec, text, low) for text, low in zip(spec["prompts"], spec["low_codes"])]
    torch.save({"tokens": torch.cat([t for t, _, _ in inputs])}, out / "inputs.pt")
    if release:  # the head casts to float32 (`final_forward`), so float64 logits carry float32
        # rounding: the final layer norm's output (the head's input) is kept too
        outputs, hidden = {}, []
        model.transformer.final_layernorm.register_forward_hook(lambda m, i, o: hidden.append(o.clone()))
        with torch.no_grad():
            for dtype in (torch.float32, torch.float64):
                model.to(dtype)
                zeros = torch.zeros(args.layout[1], args.layout[1], dtype=dtype)
                hidden.clear()
                logits = [model(t, p, m.to(dtype), log_attention_weights=zeros)[0] for t, m, p in inputs]
                outputs[str(dtype)] = {"logits": torch.cat(logits), "hidden": torch.cat(hidden)}
        model.to(torch.float32)
        torch.save(outputs, out / "logits.pt")
    engine, *_ = deepspeed.initialize(
        model=model, mpu=mpu, config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}
    )
    torch.cuda.get_rng_state = torch.get_rng_state  # as tests/sat_reference.py: no GPU here
    save_checkpoint(1000, engine, None, None, args)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
