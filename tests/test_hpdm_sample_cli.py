"""`cogvideo-sample --family hpdm`: HPDM's options and pipeline in the sampling job. A checkpoint
written here samples every prompt at twice the trained side (the pyramid tiles it); a rerun
resumes; a resampled entry and the Ray job's entries are the same videos, byte for byte (each
prompt has its own generator); bad options stop in one line each before anything loads."""

from __future__ import annotations

import json

import pytest
import torch
from test_hpdm_train import MODEL
from test_pretrain_data import write_caption_tokenizer

from cogvideo.checkpoint.format import save_model_checkpoint
from cogvideo.configio import parse_overrides
from cogvideo.family import build_model, resolve_model_section
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
    prompts.write_text("clip 0 1\nclip 2 3\nclip 1 5\n")
    return {
        "root": root,
        "ckpt": root / "ckpt",
        "tokenizer": write_caption_tokenizer(root),
        "prompts": prompts,
    }


def sample(ws, out, *extra):
    options = [f"checkpoint={ws['ckpt']}", f"text_tokenizer={ws['tokenizer']}", "steps=2", "output=[2,32,32]"]
    return main(["--family", "hpdm", "--prompts", str(ws["prompts"]), "--out", str(out), *options, *extra])


def gifs(out):
    return {p.parent.name: p.read_bytes() for p in sorted(out.glob("*/video.gif"))}


def test_sampling_resumes_and_gives_the_same_videos_locally_and_on_ray(ws, caplog):
    out = ws["root"] / "local"
    caplog.set_level("INFO")
    assert sample(ws, out, "guidance=2.0") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ok"] == 3 and all(e["frames"] == 2 for e in manifest["entries"])
    assert "level 2 of 2, step 1/1" in caplog.text  # progress per level
    first = gifs(out)
    key = sorted(first)[1]
    for path in (out / key).iterdir():
        path.unlink()
    (out / key).rmdir()
    caplog.clear()
    assert sample(ws, out, "guidance=2.0") == 0
    assert "2 of 3 prompts already done" in caplog.text
    assert gifs(out) == first  # the resampled prompt is the same video
    ray_out = ws["root"] / "ray"
    assert sample(ws, ray_out, "guidance=2.0", "workers=2", "--ray") == 0
    assert gifs(ray_out) == first


def test_bad_options_stop_in_one_line_each(ws, capsys):
    code = main(["--family", "hpdm", "--prompts", str(ws["prompts"]), "--out", "x", "overlap=1.5", "steps=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 3
    assert "checkpoint: required" in err[0] and "overlap: must be in [0, 1)" in err[2]
    assert main(["--family", "nope", "--prompts", "p", "--out", "x"]) == 2
    assert "model.family: unknown family 'nope'" in capsys.readouterr().err
    code = sample(ws, ws["root"] / "odd", "output=[2,30,32]")
    assert code == 2 and "is not tiled by (2, 8, 8) patches" in capsys.readouterr().err
