"""Parity with the release, against SwissArmyTransformer 0.2.9 itself (tests/sat_reference.py,
in four processes of its own): its CogView2 BaseModel at TP 1, 2 and 4 (SAT's own model-parallel
initialisation over gloo, its parallel layers holding their shards) gives logits on a full and a
left-padded prompt and writes its own save_checkpoint output (one rank file per TP rank, RNG state
included); each is imported through `cogvideo-convert import-sat` with the model shape and
vocabulary read from the checkpoint's model_config.json, and must give SAT's logits (1e-12
relative in float64) and SAT's rank files' tensors bit for bit."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvideo.checkpoint import load_model_config, load_model_state
from cogvideo.checkpoint.cli import main
from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.sat import COGVIDEO_SAT

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
    "tensor_parallel": [1, 2, 4],
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
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone"]
    done = subprocess.run(
        [*launch, str(script), str(out / "spec.json"), str(out)],
        env={**env, "OMP_NUM_THREADS": "1"},
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


def imported_logits(src: Path, dst: Path, tokens: torch.Tensor):
    """SAT checkpoint `src` through the CLI, run by our model: its config and fp32, fp64 logits."""
    assert import_cli(src, dst) == 0
    cfg = load_model_config(dst)
    model = build_model(cfg, init_weights=False)
    model.load_state_dict(load_model_state(dst))
    model.eval()
    with torch.no_grad():
        return cfg, model(tokens), model.double()(tokens)


def assert_reproduces(cfg, reference: dict, ours32, ours64) -> None:
    sat32, sat64 = reference["torch.float32"], reference["torch.float64"]
    scale = sat64.abs().max().item()
    assert (ours64 - sat64).abs().max().item() <= 1e-12 * scale
    assert (ours32.double() - sat64).abs().max().item() <= fp32_tolerance(cfg, scale)
    assert (ours32 - sat32).abs().max().item() <= fp32_tolerance(cfg, scale)


@pytest.mark.parametrize("tp", SPEC["tensor_parallel"])
def test_imported_cogview2_reproduces_sat_logits(sat_run, tmp_path, tp):
    sat_dir = sat_run / f"sat_tp{tp}"
    config = json.loads((sat_dir / "model_config.json").read_text())
    assert (config["vocab_size"], config["model_parallel_size"]) == (VOCAB_SIZE, tp)
    tokens = torch.load(sat_run / "inputs.pt")["tokens"]
    cfg, ours32, ours64 = imported_logits(sat_dir, tmp_path / "ours", tokens)
    assert (cfg.vocab.vocab_size, cfg.text_length, cfg.hidden_dropout, cfg.attention_dropout) == (
        VOCAB_SIZE,
        TEXT_LENGTH,
        0.1,
        0.1,
    )  # dropout: SAT's recorded defaults
    assert (tokens[1, : TEXT_LENGTH - 3] == cfg.vocab.pad_id).all()  # the second prompt is left-padded
    assert_reproduces(cfg, torch.load(sat_run / f"logits_tp{tp}.pt"), ours32, ours64)


def test_planted_rank_files_read_in_the_wrong_order_break_parity(sat_run, tmp_path):
    """The comparison above is sharp: SAT's TP=2 rank files read as each other's (a rank-order
    slip in the importer) import without complaint and miss SAT's logits by far."""
    src = tmp_path / "swapped"
    shutil.copytree(sat_run / "sat_tp2", src)
    files = [src / "1000" / f"mp_rank_{r:02d}_model_states.pt" for r in (0, 1)]
    files[0].rename(src / "1000" / "held.pt")
    files[1].rename(files[0])
    (src / "1000" / "held.pt").rename(files[1])
    tokens = torch.load(sat_run / "inputs.pt")["tokens"]
    cfg, ours32, ours64 = imported_logits(src, tmp_path / "ours", tokens)
    with pytest.raises(AssertionError):
        assert_reproduces(cfg, torch.load(sat_run / "logits_tp2.pt"), ours32, ours64)


@pytest.mark.parametrize("tp", SPEC["tensor_parallel"])
def test_sat_rank_files_with_rng_state_import_bit_equal(sat_run, tmp_path, tp):
    """SAT's own rank files at TP=tp (module + DeepSpeed fields + python/numpy/torch RNG state)
    import from the CLI at the same TP degree with every rank's tensors bit-equal."""
    src = sat_run / f"sat_tp{tp}"
    assert import_cli(src, tmp_path / "ours", "--tp", str(tp)) == 0
    for rank in range(tp):
        saved = torch.load(src / "1000" / f"mp_rank_{rank:02d}_model_states.pt", weights_only=False)
        assert {"np_rng_state", "random_rng_state", "torch_rng_state"} <= set(saved)
        ours = load_model_state(tmp_path / "ours", rank, tp)
        assert set(ours) == {COGVIDEO_SAT.our_name(k) for k in saved["module"]}
        assert all(torch.equal(ours[COGVIDEO_SAT.our_name(k)], v) for k, v in saved["module"].items())


class RunsAShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_anywhere_in_the_checkpoint_runs_nothing(sat_run, tmp_path, capsys):
    saved = torch.load(sat_run / "sat_tp2" / "1000" / "mp_rank_00_model_states.pt", weights_only=False)
    marker = tmp_path / "PWNED"
    for target in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "elsewhere.pt"):
        src = tmp_path / target / "sat"
        shutil.copytree(sat_run / "sat_tp2", src)  # SAT's own TP=2 files, one of them replaced
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
