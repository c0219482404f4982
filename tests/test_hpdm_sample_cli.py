"""`cogvideo-sample --family hpdm`: HPDM's options and pipeline in the sampling job. A checkpoint
written here samples every prompt at 1.5 times the trained side (the pyramid tiles it), its exact
frames kept; a rerun on Ray resumes, and the prompt it samples again on a Ray worker is the same
video, byte for byte (each prompt has its own generator); bad options stop in one line each
before anything loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_hpdm_train import MODEL
from test_pretrain_data import write_caption_tokenizer

from cogvideo.checkpoint.format import save_model_checkpoint
from cogvideo.configio import parse_overrides
from cogvideo.family import build_model, resolve_model_section
from cogvideo.models.hpdm.sampling import HPDMSampleOptions
from cogvideo.sampling.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpdm_sample")
    section = {k: v for k, v in parse_overrides(MODEL)["model"].items()}
    cfg = resolve_model_section(section)
    torch.manual_seed(0)
    state = {
        n: t + 0.05 * torch.randn_like(t) for n, t in build_model(cfg, device="cpu").state_dict().items()
    }
    save_model_checkpoint(root / "ckpt", state, cfg)
    prompts = root / "prompts.txt"
    prompts.write_text("clip 0 1\nclip 2 3\n")
    return {
        "root": root,
        "ckpt": root / "ckpt",
        "tokenizer": write_caption_tokenizer(root),
        "prompts": prompts,
    }


def sample(ws, out, *extra):
    options = [f"checkpoint={ws['ckpt']}", f"text_tokenizer={ws['tokenizer']}", "steps=2", "output=[2,24,24]"]
    return main(["--family", "hpdm", "--prompts", str(ws["prompts"]), "--out", str(out), *options, *extra])


def gifs(out):
    return {p.parent.name: p.read_bytes() for p in sorted(out.glob("*/video.gif"))}


def test_sampling_resumes_on_ray_and_gives_the_same_videos(ws, caplog):
    out = ws["root"] / "local"
    caplog.set_level("INFO")
    assert sample(ws, out, "guidance=2.0") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ok"] == 2 and all(e["frames"] == 2 for e in manifest["entries"])
    assert "level 2 of 2, step 1/1" in caplog.text  # progress per level
    first = gifs(out)
    key = sorted(first)[1]
    pixels = np.load(out / key / "pixels.npy", allow_pickle=False)
    assert pixels.shape == (2, 24, 24, 3) and pixels.dtype == np.uint8
    for path in (out / key).iterdir():
        path.unlink()
    (out / key).rmdir()
    caplog.clear()
    assert sample(ws, out, "guidance=2.0", "workers=2", "--ray") == 0
    assert "1 of 2 prompts already done" in caplog.text
    assert gifs(out) == first  # the prompt sampled again, on a Ray worker, is the same video
    assert np.array_equal(np.load(out / key / "pixels.npy", allow_pickle=False), pixels)


def test_bad_options_stop_in_one_line_each(ws, capsys):
    code = main(["--family", "hpdm", "--prompts", str(ws["prompts"]), "--out", "x", "overlap=1.5", "steps=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 3
    assert "checkpoint: required" in err[0] and "overlap: must be in [0, 1)" in err[2]
    code = main(["--family", "hpdm", "--prompts", str(ws["prompts"]), "--out", "x", "context_grids=0"])
    assert code == 2 and "context_grids must be >= 1" in capsys.readouterr().err
    assert HPDMSampleOptions(context_grids=3).pyramid().context_grids == 3
    assert main(["--family", "nope", "--prompts", "p", "--out", "x"]) == 2
    assert "model.family: unknown family 'nope'" in capsys.readouterr().err
    code = sample(ws, ws["root"] / "odd", "output=[2,30,32]")
    assert code == 2 and "is not tiled by (2, 8, 8) patches" in capsys.readouterr().err
