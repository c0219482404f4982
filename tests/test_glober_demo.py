"""GLOBER in the demo through its settings folder alone (configs/demo/glober/, demo.family_steps):
its KL-VAE is fitted on the demo's videos first (fit.yaml) and that folder reaches prep and both
training phases; the phases chain; the configs are valid commands' configs; the sampling options
are the folder's with what the demo gives; a bad fit.yaml stops in one line; the report sets the families side by side (accuracies,
direction and displacement by duration, FVD, seconds per sampled video). In-process, no training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cogvideo.configio import ConfigError, load_config
from cogvideo.family import resolve_model_section
from demo import driver, settings
from demo.family_steps import FamilySteps
from demo.settings import DemoConfig
from demo.steps import Runner
from demo.tasks import Demo
from pretrain.config import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore")
GLOBER = Path(settings.ROOT, "configs", "demo", "glober")


def test_globers_steps_fit_its_vae_then_build_on_it():
    cfg = DemoConfig(families=["glober"])
    steps = driver.steps_for(cfg)
    assert [s.name for s in steps] == [
        *("videos", "tokenizers", "glober_fit", "glober_shards"),
        *("glober_train_autoencoder", "glober_train_generator", "glober_sample", "glober_evaluate", "report"),
    ]
    runner = Runner(Path("unused"), steps, driver.step_settings(cfg, steps))
    assert runner.builds_on["glober_fit"] == ("tokenizers",)
    assert runner.builds_on["glober_shards"] == ("glober_fit",)  # a new fit rewrites the shards
    assert (
        driver.step_settings(cfg, steps)["configs/demo/glober/fit.yaml"] == (GLOBER / "fit.yaml").read_text()
    )


def test_every_glober_command_gets_the_fitted_vae(tmp_path, monkeypatch):
    cfg = DemoConfig(out=str(tmp_path / "out"), families=["glober"])
    demo, commands, trained = Demo(cfg), [], []

    def command(args, threads=None):
        commands.append((args, threads))
        if "--out" in args:  # cogvideo-prep
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "summary.json").write_text(json.dumps({"written": 7}))
        else:  # the fit: its folder and summary
            out = Path(next(a for a in args if a.startswith("out="))[4:])
            out.mkdir(parents=True)
            (out / "summary.json").write_text(json.dumps({"held_out_psnr_db": 30.0}))

    monkeypatch.setattr(demo, "command", command)
    monkeypatch.setattr(demo, "train_model", lambda *a: trained.append(a) or {"precision": "fp32"})
    steps, out = FamilySteps(demo, "glober"), demo.path("glober")
    assert steps.fit() == {"held_out_psnr_db": 30.0}
    ((args, threads),) = commands
    assert args[1:3] == ["-m", "cogvideo.models.glober.vae_fit"] and threads is None  # the demo's threads
    assert f"frames={demo.path('videos', 'synthetic')}" in args and f"out={out / 'fit'}" in args
    fit_config = Path(args[args.index("--config") + 1])
    assert (
        yaml.safe_load(fit_config.read_text())
        == yaml.safe_load((GLOBER / "fit.yaml").read_text())["settings"]
    )

    steps.shards()
    prep_args = commands[1][0]
    prep = yaml.safe_load(Path(prep_args[prep_args.index("--config") + 1]).read_text())
    first_phase = yaml.safe_load((GLOBER / "train_1_autoencoder.yaml").read_text())["model"]
    assert prep["model"] == {**first_phase, "vae": {"path": str(out / "fit")}}
    assert (prep["model"]["family"], prep["model"]["phase"]) == ("glober", "autoencoder")
    assert not any(a.startswith("tokenizer=") for a in prep_args)  # latent shards: no image tokenizer
    steps.train("autoencoder")
    steps.train("generator")
    (first, first_overrides, _, first_model), (second, second_overrides, _, second_model) = trained
    assert (first, second) == (GLOBER / "train_1_autoencoder.yaml", GLOBER / "train_2_generator.yaml")
    for config, overrides, phase in (
        (first, first_overrides, "autoencoder"),
        (second, second_overrides, "generator"),
    ):
        assert f"model.vae.path={out / 'fit'}" in overrides
        train = load_config(TrainConfig, config, overrides)  # what cogvideo-train reads
        model = resolve_model_section(train.model)
        assert (model.phase, model.vae.path, model.name) == (phase, str(out / "fit"), "glober-demo")
    assert f"init.backbone={first_model}" in second_overrides
    assert load_config(TrainConfig, second, second_overrides).data.caption_dropout > 0  # guidance learnt

    options = steps.sample_options(4.0, 3)
    assert (options.checkpoint, options.duration, options.seed) == (str(second_model), 4.0, 3)
    assert options.text_tokenizer == str(demo.text_model) and options.frames == 17


def test_fit_settings_take_dotted_overrides_from_the_command_line(tmp_path, monkeypatch):
    """`fit.families.glober=[...]` reaches cogvideo-fit-vae after fit.yaml's settings (so they win
    there) and is in the fit's fingerprint: the fit, and every step building on it, reruns."""
    from cogvideo.configio import parse_config
    from cogvideo.models.glober.vae_fit import FitVAEConfig, main

    overrides = ["fit.families={glober: [steps=7, batch_size=4]}"]
    plain = load_config(DemoConfig, driver.DEFAULT_CONFIG, [f"out={tmp_path}", "families=[glober]"])
    changed = load_config(
        DemoConfig, driver.DEFAULT_CONFIG, [f"out={tmp_path}", "families=[glober]", *overrides]
    )
    assert changed.fit.families == {"glober": ["steps=7", "batch_size=4"]}
    fingerprints = []
    for cfg in (plain, changed):
        steps = driver.steps_for(cfg)
        fingerprints.append(Runner(tmp_path, steps, driver.step_settings(cfg, steps)).fingerprints)
    changed_steps = [name for name in fingerprints[0] if fingerprints[0][name] != fingerprints[1][name]]
    assert changed_steps[:2] == ["glober_fit", "glober_shards"] and "tokenizers" not in changed_steps

    demo, commands = Demo(changed), []
    monkeypatch.setattr(demo, "command", lambda args, threads=None: commands.append(args))
    FamilySteps(demo, "glober").fit()
    ((args,),) = [commands]
    assert args[-2:] == ["steps=7", "batch_size=4"]
    parsed = []  # what the command reads of these arguments
    monkeypatch.setattr(
        "cogvideo.models.glober.vae_fit.parse_config", lambda *a: parsed.append(parse_config(*a)[0]) or 1 / 0
    )
    with pytest.raises(ZeroDivisionError):
        main(args[3:])
    assert (parsed[0].steps, parsed[0].batch_size) == (7, 4)
    assert (
        isinstance(parsed[0], FitVAEConfig) and parsed[0].held_out == 0.05
    )  # fit.yaml's other settings kept


def test_a_bad_fit_file_stops_in_one_line(tmp_path, monkeypatch):
    root = tmp_path / "settings"
    (root / "glober").mkdir(parents=True)
    for path in GLOBER.glob("*.yaml"):
        (root / "glober" / path.name).write_text(path.read_text())
    monkeypatch.setattr(settings, "FAMILY_SETTINGS", root)
    DemoConfig(families=["glober"])
    (root / "glober" / "fit.yaml").write_text("command: cogvideo.models.glober.vae_fit\nsettings: {}\n")
    with pytest.raises(
        ConfigError, match="glober/fit.yaml: needs command .* model_key .*got \\['command', 'settings'\\]"
    ):
        DemoConfig(families=["glober"])


def test_the_report_sets_every_family_side_by_side(tmp_path, monkeypatch):
    from report_fixture import build_report, pixel_family

    import demo.evaluation as evaluation
    from demo.report import _fmt

    monkeypatch.setattr(evaluation, "heldout_fvd", lambda *a: {"value": 99.0})
    pixels = pixel_family(tmp_path / "pixel")
    pixels.details["sampling"] = {"seconds_per_video": 2.5}
    index = build_report(tmp_path, extra=[pixels])
    text = index.read_text()
    table = text[text.index("<table class='side-by-side'>") :].split("</table>")[0]
    rows = {}
    for row in table.split("</tr>"):
        cells = re.findall(r"<t[dh]>(.*?)</t[dh]>", row)
        if cells:
            rows[cells[0]] = cells[1:]
    metrics = {f["name"]: f for f in json.loads((index.parent / "metrics.json").read_text())["families"]}
    colours = [_fmt(metrics[n]["evaluation"]["generated"]["accuracy"]["heldout"]["colour"]) for n in metrics]
    assert rows["measure"] == ["fixture family", "pixel family"] and rows["held-out colour"] == colours
    assert rows["FVD (held-out)"] == ["-", "99"]  # the fixture family's evaluation has no FVD
    assert rows["seconds per sampled video"] == ["-", "2.5"]
    moves = metrics["pixels"]["evaluation"]["displacement_by_duration"]
    for duration, move in moves.items():
        name = f"displacement at {float(duration):g} s (px / frame; reference)"
        assert rows[name][1] == f"{_fmt(move['generated'])} ({_fmt(move['reference'])})"
