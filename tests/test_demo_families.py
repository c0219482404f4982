"""The demo's families (demo.family_steps): a family joins by a settings folder; its steps build on
the shared data alone (a change reruns that family's steps and the report, no other family's);
phases chain by init.backbone; the commands and sampling options the demo gives it; a bad folder
stops in one line; a pixel model's videos are evaluated from their exact frames with its tiles'
seams; the report shows every family's column. All in-process, no training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from cogvideo.configio import ConfigError
from demo import driver, settings
from demo.family_steps import FamilySteps
from demo.settings import DemoConfig, SampleSettings, TrainSettings
from demo.steps import Runner, Step
from demo.tasks import Demo

pytestmark = pytest.mark.filterwarnings("ignore")
HPDM = Path(settings.ROOT, "configs", "demo", "hpdm")


def test_each_family_builds_on_the_shared_steps_and_the_report_on_all():
    cfg = DemoConfig(families=["cogvideo", "hpdm"])
    steps = driver.steps_for(cfg)
    names = [s.name for s in steps]
    assert names == [
        *("videos", "tokenizers", "shards", "backbone", "stage1", "stage2", "frame0", "sample", "evaluate"),
        *("hpdm_shards", "hpdm_train", "hpdm_sample", "hpdm_evaluate", "report"),
    ]
    runner = Runner(Path("unused"), steps, driver.step_settings(cfg, steps))
    assert runner.builds_on["hpdm_shards"] == ("tokenizers",)
    assert runner.builds_on["report"] == ("evaluate", "hpdm_evaluate")
    covered = driver.step_settings(cfg, steps)
    assert covered["configs/demo/hpdm/train.yaml"] == (HPDM / "train.yaml").read_text()
    assert [s.name for s in driver.steps_for(DemoConfig(families=["hpdm"]))] == [
        "videos",
        "tokenizers",
        "hpdm_shards",
        "hpdm_train",
        "hpdm_sample",
        "hpdm_evaluate",
        "report",
    ]
    assert [s.name for s in driver.steps_for(DemoConfig())] == [s.name for s in driver.STEPS]


def dag_steps(calls: list[str]) -> list[Step]:
    def run(name):
        return lambda out: calls.append(name) or {}

    return [
        Step("data", run("data"), ("d",), ("data",)),
        Step("one_train", run("one_train"), ("one",), ("one",), after=("data",)),
        Step("one_eval", run("one_eval"), (), ()),
        Step("two_train", run("two_train"), ("two",), ("two",), after=("data",)),
        Step("two_eval", run("two_eval"), (), ()),
        Step("report", run("report"), (), (), after=("one_eval", "two_eval")),
    ]


def test_a_changed_family_reruns_its_steps_and_the_report_only(tmp_path):
    calls: list[str] = []
    quiet = {"log": lambda m: None}
    Runner(tmp_path, dag_steps(calls), {"d": 1, "one": 1, "two": 1}, **quiet).run(tmp_path)
    assert calls == ["data", "one_train", "one_eval", "two_train", "two_eval", "report"]
    calls.clear()
    Runner(tmp_path, dag_steps(calls), {"d": 1, "one": 2, "two": 1}, **quiet).run(tmp_path)
    assert calls == ["one_train", "one_eval", "report"]  # a chain in order would rerun two_* too
    calls.clear()
    Runner(tmp_path, dag_steps(calls), {"d": 1, "one": 2, "two": 1}, **quiet).run(tmp_path, redo="data")
    assert calls == ["data", "one_train", "one_eval", "two_train", "two_eval", "report"]
    with pytest.raises(ValueError, match="'x' builds on \\['later'\\]"):
        Runner(tmp_path, [Step("x", lambda out: None, (), (), after=("later",))], {})


@pytest.fixture
def families(tmp_path, monkeypatch):
    """A settings root holding a copy of HPDM's demo folder, as `hpdm`."""
    root = tmp_path / "settings"
    (root / "hpdm").mkdir(parents=True)
    for path in HPDM.glob("*.yaml"):
        (root / "hpdm" / path.name).write_text(path.read_text())
    monkeypatch.setattr(settings, "FAMILY_SETTINGS", root)
    return root / "hpdm"


def test_a_bad_family_folder_stops_in_one_line(families):
    with pytest.raises(ConfigError, match="families: 'nosuch' is neither the preset's family \\(cogvideo\\)"):
        DemoConfig(families=["nosuch"])
    (families / "targets.yaml").write_text("colour: 0.9\nsharpness: 0.5\n")
    with pytest.raises(ConfigError, match="targets.yaml: goals must be numbers keyed by .*'sharpness'"):
        driver.steps_for(DemoConfig(families=["hpdm"]))
    (families / "targets.yaml").unlink()
    with pytest.raises(ConfigError, match="hpdm: missing targets.yaml"):
        DemoConfig(families=["hpdm"])
    (families / "targets.yaml").write_text("colour: 0.9\n")
    (families / "train_1_first.yaml").write_text("model: {family: hpdm}\n")
    with pytest.raises(ConfigError, match="needs train.yaml, or train_1_<phase>.yaml.*not both"):
        DemoConfig(families=["hpdm"])
    (families / "train.yaml").unlink()
    (families / "train_2_second.yaml").write_text("model: {family: glober}\n")
    with pytest.raises(ConfigError, match="train_2_second.yaml: model.family must be 'hpdm'"):
        DemoConfig(families=["hpdm"])


def test_training_settings_rerun_training_not_data_preparation(families):
    def fingerprints():
        cfg = DemoConfig(families=["hpdm"])
        steps = driver.steps_for(cfg)
        return Runner(Path("unused"), steps, driver.step_settings(cfg, steps)).fingerprints

    before = fingerprints()
    train = yaml.safe_load((families / "train.yaml").read_text())
    (families / "train.yaml").write_text(yaml.safe_dump(train | {"training": {"max_steps": 7}}))
    after = fingerprints()
    assert after["hpdm_shards"] == before["hpdm_shards"] and after["hpdm_train"] != before["hpdm_train"]
    (families / "train.yaml").write_text(yaml.safe_dump(train | {"model": {"family": "hpdm", "preset": "x"}}))
    assert fingerprints()["hpdm_shards"] != before["hpdm_shards"]  # the model section is prep's too


def phased(families: Path) -> None:
    """HPDM's demo settings as two phases, the second with a smaller learning rate."""
    train = yaml.safe_load((families / "train.yaml").read_text())
    (families / "train.yaml").unlink()
    (families / "train_1_first.yaml").write_text(yaml.safe_dump(train))
    (families / "train_2_second.yaml").write_text(yaml.safe_dump(train | {"optim": {"lr": 1e-4}}))


def test_phases_chain_and_the_demo_gives_each_command_its_data(families, tmp_path, monkeypatch):
    phased(families)
    cfg = DemoConfig(
        out=str(tmp_path / "out"),
        families=["hpdm"],
        train=TrainSettings(families={"hpdm": ["optim.lr=0.5"]}),
        sample=SampleSettings(families={"hpdm": ["steps=3"]}),
    )
    names = [s.name for s in driver.steps_for(cfg)]
    assert names[2:6] == ["hpdm_shards", "hpdm_train_first", "hpdm_train_second", "hpdm_sample"]
    demo, commands, trained = Demo(cfg), [], []

    def command(args, threads=None):
        commands.append(args)
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"written": 7}))

    monkeypatch.setattr(demo, "command", command)
    monkeypatch.setattr(demo, "train_model", lambda *a: trained.append(a) or {"precision": "fp32"})
    steps = FamilySteps(demo, "hpdm")
    assert steps.shards() == {"prep": {"written": 7}}
    (args,) = commands
    prep = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
    assert prep["model"] == {"family": "hpdm", "preset": "hpdm-demo"} and prep["stages"] == [1]
    assert not any(a.startswith("tokenizer=") for a in args)  # raw-frame shards need no image tokenizer
    steps.train("first")
    steps.train("second")
    out = demo.path("hpdm")
    (config, overrides, run, model), second = trained
    assert (
        config == families / "train_1_first.yaml"
        and run == out / "runs/first"
        and model == out / "models/first"
    )
    assert f"data.shards=['{out}/shards/shards/*.tar']" in overrides
    assert overrides[-1] == "optim.lr=0.5" and not any(o.startswith("init.backbone") for o in overrides)
    assert second[0] == families / "train_2_second.yaml"
    assert f"init.backbone={out}/models/first" in second[1] and second[3] == out / "models/second"
    options = steps.sample_options(2.0, 3)
    assert (options.checkpoint, options.duration, options.seed) == (str(out / "models/second"), 2.0, 3)
    assert options.text_tokenizer == str(demo.text_model)
    assert (options.steps, options.guidance) == (3, 2.0)  # the demo's override over sample.yaml


def test_pixel_videos_are_evaluated_from_their_frames_with_their_seams(tmp_path, monkeypatch):
    from report_fixture import pixel_family

    import demo.evaluation as evaluation

    monkeypatch.setattr(evaluation, "heldout_fvd", lambda *a: {"value": 99.0})
    family = pixel_family(tmp_path)
    seams = family.evaluation["seams"]
    assert seams["videos"] == 6 and seams["generated"] > 1.5 > seams["reference"]  # planted seams
    goals = family.targets
    assert set(goals) == {
        "held-out colour",
        "FVD (held-out)",
        evaluation.SEAMS,
    }
    assert goals["held-out colour"] == {
        "value": 4 / 6,
        "goal": ">= 0.90",
        "met": False,
    }  # read from pixels.npy
    assert goals[evaluation.SEAMS]["value"] == pytest.approx(seams["generated"] / seams["reference"])
    assert not goals[evaluation.SEAMS]["met"]
    with pytest.raises(ValueError, match="unknown goals \\['sharpness'\\]"):
        evaluation.targets(family.evaluation, {"sharpness": 1.0})


def test_the_report_has_a_column_per_family(tmp_path, monkeypatch):
    from report_fixture import build_report, pixel_family

    import demo.evaluation as evaluation

    monkeypatch.setattr(evaluation, "heldout_fvd", lambda *a: {"value": 99.0})
    index = build_report(tmp_path, extra=[pixel_family(tmp_path / "pixel")])
    text = index.read_text()
    metrics = json.loads((index.parent / "metrics.json").read_text())
    assert [f["name"] for f in metrics["families"]] == ["fixture", "pixels"]
    for link in re.findall(r"(?:src|href)='([^']+)'", text):
        assert (index.parent / link).is_file(), link
    seams = evaluation.SEAMS
    assert f"data-target='{seams}' data-met='false'" in text
    row = text[text.index(f"<td>{seams}</td>") :].split("</tr>")[0]
    assert row.count("<td>-</td>") == 1  # the token family has no seams target


def test_the_hpdm_pipeline_measures_seams_on_frames_as_the_sampler_writes_them():
    from cogvideo.models.hpdm.config import PRESETS
    from cogvideo.models.hpdm.sampling import HPDMPipeline, HPDMSampleOptions

    cfg = PRESETS["hpdm-demo"]()  # 5x16x16 patches up to 5x32x32 frames
    pipeline = HPDMPipeline(HPDMSampleOptions(overlap=0.0, temporal_overlap=0.0), None, cfg, None, None)
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(0, 3, (5, 32, 32, 3)), axis=2).astype(np.uint8)
    across, inside = pipeline.seam_contrast(smooth)
    seamed = smooth.copy()
    seamed[:, :, 16:] += 40  # a step at the tile border along the width
    stepped = pipeline.seam_contrast(seamed)
    assert stepped[0] > across + 10 and stepped[1] == pytest.approx(inside)
    seamed = smooth.copy()
    seamed[:, :, :, 0] += 40 * (np.arange(32) >= 16).astype(np.uint8)[None, :, None]  # along the height
    assert pipeline.seam_contrast(seamed)[0] > across + 3


def test_the_hpdm_column_samples_the_average_of_its_weights(tmp_path, monkeypatch):
    """The demo's HPDM training keeps an average of its weights (optim.ema_decay) and the demo's
    conversion exports it (no --no-ema), so the column samples the average. Planted: a train.yaml
    without the average, and a conversion with --no-ema, each fail the check."""
    from pretrain.config import load_train_config

    def samples_the_average(config: Path, convert: list[str]) -> bool:
        return load_train_config(str(config)).optim.ema_decay > 0 and "--no-ema" not in convert

    demo, commands = Demo(DemoConfig(out=str(tmp_path / "out"), families=["hpdm"])), []
    monkeypatch.setattr(demo, "command", lambda args, threads=None: commands.append(args))
    monkeypatch.setattr("demo.tasks.training_summary", lambda run: {})
    demo.train_model(HPDM / "train.yaml", [], tmp_path / "run", tmp_path / "model")
    train, convert = commands
    assert "pretrain.train" in train and convert[convert.index("cogvideo.checkpoint.cli") + 1] == "zero"
    assert samples_the_average(HPDM / "train.yaml", convert)
    config = yaml.safe_load((HPDM / "train.yaml").read_text())
    del config["optim"]["ema_decay"]
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert not samples_the_average(tmp_path / "train.yaml", convert)
    assert not samples_the_average(HPDM / "train.yaml", [*convert, "--no-ema"])


def test_the_hpdm_column_trains_at_a_constant_learning_rate_after_the_warm_up():
    """configs/demo/hpdm/train.yaml holds the learning rate from the end of its warm-up to its last
    step (optim.min_lr_ratio 1): the demo's level 1 took direction only late in its steps (README).
    Planted: the trainer's default cosine decay (min_lr_ratio 0.1) fails the check."""
    from pretrain.config import load_train_config
    from pretrain.optim import lr_factor

    def lowest_after_warm_up(overrides: list[str]) -> float:
        cfg = load_train_config(str(HPDM / "train.yaml"), overrides)
        o, total = cfg.optim, cfg.training.max_steps
        return min(
            lr_factor(step, o.warmup_steps, total, o.min_lr_ratio) for step in range(o.warmup_steps, total)
        )

    assert lowest_after_warm_up([]) == 1.0
    assert lowest_after_warm_up(["optim.min_lr_ratio=0.1"]) < 0.2


def test_the_hpdm_column_blends_token_borders_in_its_head_and_its_context():
    """The demo's seams target (issue 25) is met by the preset's overlapped head and the column's
    context on two token grids (README): configs/demo/hpdm/train.yaml trains `hpdm-demo` with
    head_overlap and sample.yaml samples with context_grids 2. Planted: either turned off fails."""
    from cogvideo.configio import load_config
    from cogvideo.family import resolve_model_section
    from cogvideo.models.hpdm.sampling import HPDMSampleOptions

    def blended(train: list[str], sample: list[str]) -> bool:
        model = yaml.safe_load((HPDM / "train.yaml").read_text())["model"]
        overrides = dict(item.split("=", 1) for item in train)
        cfg = resolve_model_section({**model, **{k: yaml.safe_load(v) for k, v in overrides.items()}})
        options = load_config(HPDMSampleOptions, HPDM / "sample.yaml", ["checkpoint=c", *sample])
        return cfg.head_overlap and options.pyramid().context_grids == 2

    assert blended([], [])
    assert not blended(["head_overlap=false"], [])
    assert not blended([], ["context_grids=1"])
