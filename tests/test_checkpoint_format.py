"""Our checkpoint format: save/load at any TP degree, exact split/merge, atomic writes, inspect,
and clear errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from process_helpers import torchrun_self

from cogvideo.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_model_config,
    load_model_state,
    reshard,
    save_model_checkpoint,
)
from cogvideo.checkpoint.cli import describe, main
from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.params import count_parameters


def tiny8():
    """tiny with 8 heads, so that TP 1, 2, 4 and 8 are all valid."""
    return get_preset("tiny").replace(num_heads=8).validate(8)


@pytest.fixture(scope="module")
def model_sd():
    torch.manual_seed(0)
    cfg = tiny8()
    sd = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    for name in sd:  # make every tensor distinct, including the zero-initialised gates
        sd[name] = sd[name] + torch.randn_like(sd[name]) * 0.1
    return cfg, sd


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def reference_shard(name: str, t: torch.Tensor, r: int, n: int) -> torch.Tensor:
    """The Megatron split written out by hand (independent of cogvideo.parallel)."""
    if ".query_key_value." in name:
        q, k, v = t.chunk(3, dim=0)
        return torch.cat([x.chunk(n, dim=0)[r] for x in (q, k, v)])
    if ".mlp.dense_h_to_4h." in name or name == "word_embeddings.weight":
        return t.chunk(n, dim=0)[r]
    if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")):
        return t.chunk(n, dim=1)[r]
    return t


def test_save_load_round_trip_and_layout(tmp_path, model_sd):
    cfg, sd = model_sd
    out = save_model_checkpoint(tmp_path / "ck", sd, cfg, iteration=42, max_shard_bytes=16_000)
    info = json.loads((out / "config.json").read_text())
    assert (info["format"], info["version"], info["iteration"], info["tensor_parallel"]) == (
        "cogvideo",
        1,
        42,
        1,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(sd)
    assert load_model_config(out) == cfg
    loaded = load_model_state(out)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd) and set(loaded) == set(sd)
    assert leftovers(tmp_path) == []
    # the model is recorded with its family; a config.json from before families loads as CogVideo's
    assert info["model"]["family"] == "cogvideo" and info["model"]["num_heads"] == cfg.num_heads
    del info["model"]["family"]
    (out / "config.json").write_text(json.dumps(info))
    assert load_model_config(out) == cfg and describe(out)["family"] == "cogvideo"


@pytest.mark.parametrize("stored,wanted", [(1, 2), (2, 1), (2, 4), (4, 2), (8, 1), (1, 8)])
def test_any_stored_degree_loads_at_any_degree(tmp_path, model_sd, stored, wanted):
    cfg, sd = model_sd
    out = save_model_checkpoint(tmp_path / "ck", sd, cfg, tensor_parallel=stored)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == (
        [] if stored == 1 else [f"tp_rank_{r:02d}" for r in range(stored)]
    )
    for rank in range(wanted):
        local = load_model_state(out, rank, wanted)
        for name, tensor in sd.items():
            assert torch.equal(local[name], reference_shard(name, tensor, rank, wanted)), (name, rank)


def test_split_then_merge_is_identity(tmp_path, model_sd):
    cfg, sd = model_sd
    src = save_model_checkpoint(tmp_path / "tp1", sd, cfg, iteration=3)
    hops = [src]
    for tp in (8, 2, 4, 1):
        hops.append(reshard(hops[-1], tmp_path / f"hop{len(hops)}-tp{tp}", tp))
        assert json.loads((hops[-1] / "config.json").read_text())["tensor_parallel"] == tp
    back = load_model_state(hops[-1])
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert load_model_config(hops[-1]) == cfg


def test_export_casts_and_cli_reshard(tmp_path, model_sd):
    cfg, sd = model_sd
    src = save_model_checkpoint(tmp_path / "tp2", sd, cfg, tensor_parallel=2)
    assert (
        main(["export", str(src), str(tmp_path / "bf16"), "--dtype", "bf16", "--max-shard-size", "8KB"]) == 0
    )
    exported = load_model_state(tmp_path / "bf16")
    assert all(torch.equal(exported[k], sd[k].to(torch.bfloat16)) for k in sd)
    assert main(["reshard", str(src), str(tmp_path / "tp4"), "--tp", "4"]) == 0
    assert all(
        torch.equal(load_model_state(tmp_path / "tp4", 3, 4)[k], reference_shard(k, sd[k], 3, 4)) for k in sd
    )


def test_inspect_reports_counts_degree_iteration_completeness(tmp_path, model_sd, capsys):
    cfg, sd = model_sd
    out = save_model_checkpoint(tmp_path / "ck", sd, cfg, iteration=9, tensor_parallel=2)
    report = describe(out)
    counts = count_parameters(cfg)
    assert report["parameters"] == counts.total and report["trainable_parameters"] == counts.trainable
    assert (report["tensor_parallel"], report["iteration"], report["dtype"], report["complete"]) == (
        2,
        9,
        "fp32",
        True,
    )
    assert report["preset"] == cfg.name
    shard = next((out / "tp_rank_01").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-50])
    assert main(["inspect", str(out), "--json"]) == 1  # it prints the problem and fails
    report = json.loads(capsys.readouterr().out)
    assert report["complete"] is False and shard.name in report["problem"]


def test_never_overwrites_without_force_and_is_atomic(tmp_path, model_sd):
    cfg, sd = model_sd
    out = save_model_checkpoint(tmp_path / "ck", sd, cfg, iteration=1)
    with pytest.raises(CheckpointError, match="already exists"):
        save_model_checkpoint(out, sd, cfg, iteration=2)
    assert load_model_config(out) == cfg and json.loads((out / "config.json").read_text())["iteration"] == 1

    def failing():
        yield from list(sd.items())[:3]
        raise RuntimeError("source died")

    from cogvideo.checkpoint.format import write_checkpoint

    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    with pytest.raises(RuntimeError, match="source died"):
        write_checkpoint(out, cfg, shapes, failing(), force=True)
    assert json.loads((out / "config.json").read_text())["iteration"] == 1  # old one intact
    save_model_checkpoint(out, sd, cfg, iteration=2, force=True)
    assert json.loads((out / "config.json").read_text())["iteration"] == 2
    assert leftovers(tmp_path) == []


def test_bad_state_dicts_list_keys_and_write_nothing(tmp_path, model_sd):
    cfg, sd = model_sd
    bad = dict(sd)
    del bad["layers.1.temporal_gate"]
    bad["layers.0.surprise.weight"] = torch.zeros(2)
    bad["final_layernorm.weight"] = torch.zeros(cfg.hidden_size + 1)
    with pytest.raises(CheckpointError) as err:
        save_model_checkpoint(tmp_path / "bad", bad, cfg)
    message = str(err.value)
    assert "layers.1.temporal_gate" in message and "layers.0.surprise.weight" in message
    assert "final_layernorm.weight: (33,)" in message
    with pytest.raises(CheckpointError, match="num_heads"):
        save_model_checkpoint(tmp_path / "bad", sd, get_preset("tiny"), tensor_parallel=8)
    assert list(tmp_path.iterdir()) == []


def test_damaged_checkpoints_fail_clearly(tmp_path, model_sd):
    cfg, sd = model_sd
    good = save_model_checkpoint(tmp_path / "good", sd, cfg, tensor_parallel=2, max_shard_bytes=16_000)

    def damaged(name, damage):
        path = tmp_path / name
        subprocess.run(["cp", "-r", str(good), str(path)], check=True)
        damage(path)
        return path

    missing_rank = damaged(
        "missing_rank", lambda p: subprocess.run(["rm", "-r", str(p / "tp_rank_01")], check=True)
    )
    with pytest.raises(CheckpointError, match="tp_rank_01: missing"):
        load_model_state(missing_rank)
    missing_file = damaged("missing_file", lambda p: next((p / "tp_rank_00").glob("model-00002-*")).unlink())
    with pytest.raises(CheckpointError, match="model-00002-of-.*missing"):
        load_model_state(missing_file)

    def truncate(p):
        f = next((p / "tp_rank_01").glob("model-00001-*"))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    with pytest.raises(CheckpointError, match="not a complete safetensors file"):
        load_model_state(damaged("truncated", truncate))

    def wrong_format(p):
        (p / "config.json").write_text(json.dumps({"format": "megatron", "version": 1}))

    with pytest.raises(CheckpointError, match="format is 'megatron'"):
        load_model_config(damaged("wrong_format", wrong_format))
    with pytest.raises(CheckpointError, match="checkpoint config not found"):
        load_model_state(tmp_path / "good" / "tp_rank_00")
    other = damaged("other_model", lambda p: None)
    info = json.loads((other / "config.json").read_text())
    info["model"]["num_layers"] = 3
    (other / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): layers\.2\."):
        load_model_state(other)
    assert main(["reshard", str(missing_rank), str(tmp_path / "out"), "--tp", "1"]) == 2
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_tp2_under_two_gloo_ranks_matches_merged_model(tmp_path, model_sd):
    cfg, sd = model_sd
    ckpt = save_model_checkpoint(tmp_path / "tp2", sd, cfg, tensor_parallel=2)
    torch.manual_seed(1)
    tokens = torch.randint(0, cfg.vocab.num_image_tokens, (2, cfg.text_length + 2 * cfg.tokens_per_frame))
    torch.save(tokens, tmp_path / "tokens.pt")
    model = build_model(cfg, init_weights=False)
    model.load_state_dict(load_model_state(ckpt))
    with torch.no_grad():
        expected = model(tokens)
    torchrun_self(__file__, [str(ckpt), str(tmp_path)], timeout=240)
    shards = [torch.load(tmp_path / f"logits{r}.pt") for r in range(2)]
    assert torch.allclose(torch.cat(shards, dim=-1), expected, atol=1e-5, rtol=1e-5)


def _tp_worker(ckpt: str, out: str) -> None:
    """torchrun entry: load the checkpoint at TP=2 into the megatron-layer model and write this
    rank's vocabulary shard of the logits."""
    from cogvideo import parallel

    parallel.init_distributed(2, backend="gloo")
    cfg = load_model_config(ckpt)
    model = build_model(cfg)
    model.load_state_dict(load_model_state(ckpt, parallel.tp_rank(), parallel.tp_size()))
    with torch.no_grad():
        logits = model(torch.load(Path(out) / "tokens.pt"))
    torch.save(logits, Path(out) / f"logits{parallel.tp_rank()}.pt")
    parallel.destroy()


def test_the_tools_stream_within_a_bound_set_by_shard_and_tensor_size(tmp_path):
    """Peak memory of reshard (split and merge), import-sat and export-sat on a 190 MiB checkpoint
    of 4 MiB tensors with 8 MiB output shards, each in a fresh process (tests/peak_memory.py),
    above what `inspect` needs to open the same checkpoint and build the model on the meta device,
    within `streaming_bound`. A tool that kept what it read (the whole checkpoint) fails it by a
    factor of 2-3 (seen: 221 MiB against 80 MiB when safetensors reads kept their pages mapped)."""
    from peak_memory import converter_peak, streaming_bound

    cfg = get_preset("tiny").replace(hidden_size=512, num_heads=8, num_layers=12).validate(4)
    torch.manual_seed(0)
    sd = build_model(cfg).state_dict()
    whole, largest = sum(t.nbytes for t in sd.values()), max(t.nbytes for t in sd.values())
    save_model_checkpoint(tmp_path / "tp1", sd, cfg)
    del sd
    shard, MiB = 8 << 20, 1 << 20
    overhead = converter_peak(["inspect", tmp_path / "tp1"])["increase"]

    def bound(tp_out: int) -> int:
        return streaming_bound(tp_out, shard, largest)

    size = ["--max-shard-size", str(shard)]
    tools = {
        "split TP 1 -> 4": (["reshard", tmp_path / "tp1", tmp_path / "tp4", "--tp", "4", *size], bound(4)),
        "merge TP 4 -> 1": (["reshard", tmp_path / "tp4", tmp_path / "back", "--tp", "1", *size], bound(1)),
        # SAT's rank files are single torch.save pickles: one rank's tensors (the checkpoint / TP) are held
        "export-sat TP 2": (
            ["export-sat", tmp_path / "tp4", tmp_path / "sat", "--tp", "2"],
            bound(0) + whole // 2,
        ),
        "import-sat TP 2": (
            ["import-sat", tmp_path / "sat", tmp_path / "ours", "--tp", "2", "--base", "tiny", *size],
            bound(2),
        ),
    }
    for tool, (args, limit) in tools.items():
        held = converter_peak(args)["increase"] - overhead
        print(f"{tool}: {held / MiB:.0f} MiB (bound {limit / MiB:.0f} MiB, checkpoint {whole / MiB:.0f} MiB)")
        assert held <= limit < whole, tool
    back, start = Checkpoint(tmp_path / "back"), Checkpoint(tmp_path / "tp1")
    assert all(torch.equal(back.full(n), start.full(n)) for n in start.names())


if __name__ == "__main__":
    _tp_worker(*sys.argv[1:3])
