"""Parity with the release, against SwissArmyTransformer 0.2.9 itself (tests/sat_reference.py,
in its own process): its CogView2 BaseModel's logits on a full and a left-padded prompt, and
its own save_checkpoint output (RNG state included), imported through `cogvideo-convert
import-sat` with the model shape and vocabulary read from the checkpoint's model_config.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint_sat import sat_rank_shard

from cogvideo.checkpoint import load_model_config, load_model_state
from cogvideo.checkpoint.cli import main
from cogvideo.checkpoint.sat import our_name
from cogvideo.config import get_preset
from cogvideo.family import build_model

pytestmark = pytest.mark.slow  # SAT runs in a subprocess (gloo, DeepSpeed engine for its save)

TINY = get_preset("tiny")
TEXT_LENGTH = 6  # not tiny's 8: taken from --set, as model_config.json of CogView2 has no layout
VOCAB_SIZE = 256  # not a preset's (tiny's is 192): read from model_config.json
SPEC = {
    "num_layers": TINY.num_layers,
    "hidden_size": TINY.hidden_size,
    "num_heads": TINY.num_heads,
    "vocab_size": VOCAB_SIZE,
    "max_sequence_length": TINY.position_rows,
    "text_length": TEXT_LENGTH,
    "image_position_offset": TINY.position_offset,
    "frame_tokens": TINY.frame_tokens,
    "pad_id": TINY.vocab.pad_id,
    "boi_id": TINY.vocab.boi_id,
    "seed": 7,
    # a full-length prompt and a 3-token one (left-padded by the reference)
    "text_ids": [
        [TINY.vocab.text_offset + i for i in (5, 17, 2, 40, 33, 9)],
        [TINY.vocab.text_offset + i for i in (12, 61, 7)],
    ],
    "image_codes": [
        [(7 * i + 3) % TINY.vocab.num_image_tokens for i in range(16)],
        [(5 * i + 11) % TINY.vocab.num_image_tokens for i in range(16)],
    ],
}


@pytest.fixture(scope="module")
def sat_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sat_reference")
    (out / "spec.json").write_text(json.dumps(SPEC))
    script = Path(__file__).with_name("sat_reference.py")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    done = subprocess.run(
        [sys.executable, str(script), str(out / "spec.json"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def import_cli(src: Path, dst: Path, *extra: str) -> int:
    return main(
        ["import-sat", str(src), str(dst), "--base", "tiny", "--set", f"text_length={TEXT_LENGTH}", *extra]
    )


def fp32_tolerance(cfg, scale: float) -> float:
    """Worst-case forward rounding bound: each of the 4 matrix products per layer and the
    logits one is an inner product of length <= k = ffn size, whose error is <= k * eps * |terms|;
    they compound additively to first order, relative to the logits' scale."""
    products = 4 * cfg.num_layers + 1
    return products * cfg.ffn_size * torch.finfo(torch.float32).eps * scale


def test_imported_cogview2_reproduces_sat_logits(sat_run, tmp_path):
    sat_dir = sat_run / "sat"
    assert json.loads((sat_dir / "model_config.json").read_text())["vocab_size"] == VOCAB_SIZE
    assert import_cli(sat_dir, tmp_path / "ours") == 0
    cfg = load_model_config(tmp_path / "ours")
    assert (cfg.vocab.vocab_size, cfg.text_length, cfg.hidden_dropout, cfg.attention_dropout) == (
        VOCAB_SIZE,
        TEXT_LENGTH,
        0.1,
        0.1,
    )  # dropout: SAT's recorded defaults
    model = build_model(cfg, init_weights=False)
    model.load_state_dict(load_model_state(tmp_path / "ours"))
    model.eval()
    tokens = torch.load(sat_run / "inputs.pt")["tokens"]
    assert (tokens[1, : TEXT_LENGTH - 3] == cfg.vocab.pad_id).all()  # the second prompt is left-padded
    reference = torch.load(sat_run / "logits.pt")
    with torch.no_grad():
        ours32 = model(tokens)
        ours64 = model.double()(tokens)
    sat32, sat64 = reference["torch.float32"], reference["torch.float64"]
    scale = sat64.abs().max().item()
    assert (ours64 - sat64).abs().max().item() <= 1e-12 * scale
    assert (ours32.double() - sat64).abs().max().item() <= fp32_tolerance(cfg, scale)
    assert (ours32 - sat32).abs().max().item() <= fp32_tolerance(cfg, scale)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sat_rank_files_with_rng_state_import_bit_equal(sat_run, tmp_path, tp):
    """SAT's own rank file (module + DeepSpeed fields + python/numpy/torch RNG state), split
    into TP rank files as SAT's parallel layers hold them, imports from the CLI bit-equal."""
    saved = torch.load(sat_run / "sat" / "1000" / "mp_rank_00_model_states.pt", weights_only=False)
    assert {"np_rng_state", "random_rng_state", "torch_rng_state"} <= set(saved)
    full = saved["module"]
    src = tmp_path / "sat"
    (src / "1000").mkdir(parents=True)
    (src / "latest").write_text("1000")
    config = json.loads((sat_run / "sat" / "model_config.json").read_text())
    (src / "model_config.json").write_text(json.dumps({**config, "model_parallel_size": tp}))
    for rank in range(tp):
        module = {k: sat_rank_shard(k, v, rank, tp).clone() for k, v in full.items()}
        torch.save(
            {**saved, "module": module, "mp_world_size": tp},
            src / "1000" / f"mp_rank_{rank:02d}_model_states.pt",
        )
    assert import_cli(src, tmp_path / "ours", "--tp", "2") == 0
    ours = load_model_state(tmp_path / "ours")
    assert set(ours) == {our_name(k) for k in full}
    assert all(torch.equal(ours[our_name(k)], v) for k, v in full.items())


class RunsAShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_anywhere_in_the_checkpoint_runs_nothing(sat_run, tmp_path, capsys):
    saved = torch.load(sat_run / "sat" / "1000" / "mp_rank_00_model_states.pt", weights_only=False)
    config = json.loads((sat_run / "sat" / "model_config.json").read_text())
    marker = tmp_path / "PWNED"
    for target in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "elsewhere.pt"):
        src = tmp_path / target / "sat"
        (src / "1000").mkdir(parents=True)
        (src / "latest").write_text("1000")
        (src / "model_config.json").write_text(json.dumps({**config, "model_parallel_size": 2}))
        for rank in range(2):
            module = {k: sat_rank_shard(k, v, rank, 2).clone() for k, v in saved["module"].items()}
            torch.save({**saved, "module": module}, src / "1000" / f"mp_rank_{rank:02d}_model_states.pt")
        torch.save({**saved, "np_rng_state": RunsAShellCommand(marker)}, src / "1000" / target)
        code = import_cli(src, tmp_path / target / "ours")
        err = capsys.readouterr().err
        assert not marker.exists()
        if target == "elsewhere.pt":  # not a file the importer reads
            assert code == 0
            continue
        assert code == 2 and not (tmp_path / target / "ours").exists()
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert f"{src / '1000' / target}: refused to unpickle posix.system" in err
        assert "weights_only" not in err
