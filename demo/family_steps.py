"""The demo's steps for a model family trained beside the preset's hierarchy (the demo's
`families` setting), on the same videos, text tokenizer, prompts, evaluation and report. This is
the one way a family joins the demo: a folder of settings, no code. `configs/demo/<family>/`:

    prep.yaml       cogvideo-prep's config (stages, rates); its model section is the first
                    training phase's (the family's encoder writes the family's shard kind)
    train.yaml      cogvideo-train's config, model.family and model.preset included; or, for a
                    family trained in phases, train_1_<phase>.yaml, train_2_<phase>.yaml, ...: each
                    phase after the first starts from the one before's model (init.backbone)
    sample.yaml     the family's cogvideo-sample options (`--family <family> --help` lists them)
    targets.yaml    its goals on the held-out prompts (keys of demo.evaluation.GOALS)
    fit.yaml        optional, for a model that needs a frame codec fitted on the demo's videos
                    (GLOBER's KL-VAE): command (a module run with python -m, taking frames=DIR
                    and out=FOLDER), model_key (the dotted model field that takes the folder) and
                    settings (the command's config; `fit.families.<family>=[key=value, ...]`
                    overrides them from the command line)
    stage.yaml      optional, for a stage of the preset family's pipeline (CogView2's direct
                    super-resolution): init (the demo model its first phase starts from:
                    backbone, stage1 or stage2), sample_option (the option of the hierarchy's
                    sampling that takes the family's model), video_scale (its videos: the demo's
                    synthetic ones rendered that many times finer, e.g. a super-resolution
                    model's high-res frames), num_videos (the first so many of them; null: all),
                    evaluation (prompts, or super_resolution: demo.sr_evaluation's figures too)

Steps, named `<family>_<step>`, everything under `<out>/<family>/`:

    fit             with fit.yaml: its command on the demo's synthetic videos (fit/); prep and
                    every training phase get model.<model_key>=<out>/<family>/fit
    videos          with stage.yaml's video_scale or num_videos: the demo's synthetic videos
                    rendered again at that scale (videos/, captions.jsonl beside them)
    shards          cogvideo-prep of the demo's videos, or the family's own (the image tokenizer
                    too for token shards)
    train[_<phase>] cogvideo-train on the demo's CPU ranks (runs/<phase>), then cogvideo-convert
                    zero (models/<phase>); a stage's first phase from the demo model stage.yaml
                    names (init.backbone), built on that model's step
    sample          the demo's prompts (held-out and seen, every duration and seed) with the
                    family's sampling pipeline (ModelFamily.sampler); the options it has of
                    checkpoint (the last phase's model), text_tokenizer, image_tokenizer, duration
                    and seed are set by the demo. A stage: the hierarchy's sampling again (the
                    same videos, seeded alike), its sample_option given the last phase's model,
                    sample.yaml's keys as further options; built on the hierarchy's sample step
    evaluate        the demo's evaluation of the videos (a pixel model's pixels.npy, or codes.npy
                    decoded by the demo's image tokenizer at the codes' grid; an SR stage's
                    posterior mean: its pixels.npy, the tokenizer at that grid for the round
                    trip) and, where the pipeline has seam_contrast(frames), its tiles' seams; with a stage's
                    evaluation super_resolution, demo.sr_evaluation's figures; the family's targets

Nothing here names a family.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from cogvideo.configio import ConfigError, load_config, merge
from cogvideo.jsonl import read_jsonl, write_jsonl
from demo.settings import (
    FIT_FILE,
    ROOT,
    STAGE_FILE,
    family_fit,
    family_folder,
    family_phases,
    family_stage,
)
from demo.steps import Step
from demo.tasks import TRAINING_SEED, Demo, precision_label


class FamilySteps:
    """What each step of family `name` does, on the demo's paths and commands (`demo.tasks.Demo`)."""

    def __init__(self, demo: Demo, name: str):
        self.demo, self.name, self.settings = demo, name, family_folder(name)
        self.phases, self.stage = family_phases(name), family_stage(name)

    def path(self, *parts: str):
        return self.demo.path(self.name, *parts)

    def config(self, file: str) -> dict:
        return yaml.safe_load((self.settings / file).read_text(encoding="utf-8")) or {}

    @property
    def model_section(self) -> dict:
        """The first phase's model section, with the fitted codec's folder (fit.yaml) where it has one."""
        fitted: dict = {}
        if spec := family_fit(self.name):
            *parents, leaf = spec["model_key"].split(".")
            fitted = {leaf: str(self.path("fit"))}
            for parent in reversed(parents):
                fitted = {parent: fitted}
        return merge(self.config(self.phases[0][1].name).get("model", {}), fitted)

    def fit(self) -> dict:
        """The frame codec the family's model needs (fit.yaml: `python -m <command>` with its
        settings), fitted on the demo's synthetic videos into <family>/fit; the command's
        summary.json where it writes one."""
        spec = family_fit(self.name)
        config = self.path("fit.yaml")
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(spec["settings"]))
        self.demo.command(
            [
                sys.executable,
                "-m",
                spec["command"],
                "--config",
                str(config),
                f"frames={self.demo.path('videos', 'synthetic')}",
                f"out={self.path('fit')}",
                *self.demo.cfg.fit.families.get(self.name, []),
            ]
        )
        summary = self.path("fit", "summary.json")
        return json.loads(summary.read_text()) if summary.is_file() else {"folder": str(self.path("fit"))}

    @property
    def has_videos(self) -> bool:
        spec = self.stage
        return bool(spec and (spec["video_scale"] != 1 or spec["num_videos"]))

    def videos(self) -> dict:
        """The demo's synthetic videos (the first num_videos) rendered again at video_scale."""
        from data_prep.synthetic import write_videos

        spec, folder = self.stage, self.path("videos")
        rows = [r for r in read_jsonl(self.demo.path("videos", "captions.jsonl")) if "render_seed" in r]
        rows = [{**r, "path": Path(r["path"]).name} for r in rows[: spec["num_videos"]]]
        write_videos(folder / "synthetic", rows, progress=True, scale=spec["video_scale"])
        write_jsonl(
            folder / "captions.jsonl",
            [{**r, "path": f"synthetic/{r['path']}", "scale": spec["video_scale"]} for r in rows],
            "w",
        )
        return {"videos": len(rows), "scale": spec["video_scale"]}

    def pipeline_class(self):
        from cogvideo.sampling.cli import family_pipeline

        return family_pipeline(self.name)

    def shards(self) -> dict:
        from cogvideo.family import get_family

        config = self.path("prep.yaml")  # prep.yaml with the model section the family trains
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump({**self.config("prep.yaml"), "model": self.model_section}))
        tokenizer = get_family(self.name).shard_kind == "tokens"
        overrides = [f"tokenizer={self.demo.image_model}"] if tokenizer else []
        videos = self.path("videos") if self.has_videos else None
        return {"prep": self.demo.prepare(self.path("shards"), config, *overrides, videos=videos)}

    def model(self, phase: str):
        return self.path("models", phase)

    def train(self, phase: str) -> dict:
        from data_prep.output import SHARD_DIR

        cfg = self.demo.cfg
        names = [name for name, _ in self.phases]
        index = names.index(phase)
        overrides = [
            f"data.shards=['{self.path('shards', SHARD_DIR)}/*.tar']",
            f"data.text_tokenizer={self.demo.text_model}",
            f"checkpoint.dir={self.path('runs', phase)}",
            f"training.seed={TRAINING_SEED + cfg.seed}",
            *([f"init.backbone={self.model(names[index - 1])}"] if index else []),
            *(
                [f"init.backbone={self.demo.path('models', self.stage['init'])}"]
                if self.stage and not index
                else []
            ),
            *([f"model.{spec['model_key']}={self.path('fit')}"] if (spec := family_fit(self.name)) else []),
            *cfg.train.families.get(self.name, []),
        ]
        config = self.phases[index][1]
        return self.demo.train_model(config, overrides, self.path("runs", phase), self.model(phase))

    def sample_options(self, duration: float, seed: int):
        options = self.pipeline_class().options_class
        given = {
            "checkpoint": self.model(self.phases[-1][0]),
            "text_tokenizer": self.demo.text_model,
            "image_tokenizer": self.demo.image_model,
            "duration": duration,
            "seed": seed,
        }
        known = {f.name for f in dataclasses.fields(options)}
        overrides = [f"{key}={value}" for key, value in given.items() if key in known]
        overrides += self.demo.cfg.sample.families.get(self.name, [])
        return load_config(options, self.settings / "sample.yaml", overrides)

    def stage_sample_options(self) -> list[str]:
        """A stage's options of the hierarchy's sampling: its model, its sample.yaml, the demo's
        sample.families.<family>."""
        given = [f"{self.stage['sample_option']}={self.model(self.phases[-1][0])}"]
        given += [f"{key}={json.dumps(value)}" for key, value in self.config("sample.yaml").items()]
        return given + self.demo.cfg.sample.families.get(self.name, [])

    def sample(self) -> dict:
        if self.stage:
            return self.demo.sample(self.path("samples"), self.stage_sample_options())
        return self.demo.sample_prompts(self.path("samples"), self.sample_options, self.pipeline_class())

    def evaluate(self) -> dict:
        import torch

        from demo.evaluation import evaluate_samples, targets

        cfg = self.demo.cfg
        videos = read_jsonl(self.path("samples", "videos.jsonl"))
        seams, image_tokenizer, tokenizer, scale = None, None, None, 1
        if not self.stage:
            pipeline = self.pipeline_class().load(
                self.sample_options(cfg.sample.durations[0], cfg.sample.seeds[0])
            )
            seams = getattr(pipeline, "seam_contrast", None)
        folder = Path(videos[0]["dir"])
        if (folder / "codes.npy").is_file() or (folder / "codes_low.npy").is_file():  # a token model's
            from cogvideo.tokenizers import load_image_tokenizer

            image_tokenizer = load_image_tokenizer(self.demo.image_model)
            patch = image_tokenizer.frame_size // image_tokenizer.tokens_side
            side = (  # at the videos' grid (an SR stage that hands out pixels: theirs over the patch)
                np.load(folder / "codes.npy", mmap_mode="r").shape[-1]
                if (folder / "codes.npy").is_file()
                else np.load(folder / "pixels.npy", mmap_mode="r").shape[-2] // patch
            )
            scale = side // image_tokenizer.tokens_side
            tokenizer = image_tokenizer.at_grid(side) if scale != 1 else image_tokenizer
        torch.set_num_threads(cfg.eval.threads)
        summary = evaluate_samples(
            videos,
            tokenizer,
            cfg.model().frame_size * scale,
            float(np.mean(cfg.videos.speed_px_per_s)) * scale,
            cfg.seed,
            cfg.sample.seeds[0],
            references=self.path("eval", "references"),
            seams=seams,
        )
        if self.stage and self.stage["evaluation"] == "super_resolution":
            from cogvideo.synthetic import default_radius
            from demo.sr_evaluation import super_resolution_summary

            summary["super_resolution"] = super_resolution_summary(
                videos,
                image_tokenizer,
                tokenizer,
                default_radius(cfg.model().frame_size),
                hierarchy=self.demo.path("samples"),
            )
        torch.set_num_threads(cfg.threads)
        write_jsonl(self.path("eval", "videos.jsonl"), videos, "w")
        self.path("eval", "evaluation.json").write_text(json.dumps(summary, indent=2))
        return {"targets": targets(summary, self.config("targets.yaml")), "fvd": summary["fvd"]["value"]}

    def result(self, summary: dict):
        """The family's column of the report (demo.report.FamilyResult)."""
        from demo.report import FamilyResult

        results = summary["results"]
        training = {phase: results[step_name(self.name, phase, self.phases)] for phase, _ in self.phases}
        preset = self.model_section.get("preset", "")
        return FamilyResult(
            name=self.name,
            title=f"{self.name} ({preset} preset, {precision_label(training)}, seed {self.demo.cfg.seed})",
            videos=read_jsonl(self.path("eval", "videos.jsonl")),
            evaluation=json.loads(self.path("eval", "evaluation.json").read_text()),
            targets=results[f"{self.name}_evaluate"]["targets"],
            curves={phase: self.path("runs", phase, "logs", "metrics.jsonl") for phase, _ in self.phases},
            details={
                "training": training,
                "prep": results[f"{self.name}_shards"]["prep"],
                **({"videos": results[f"{self.name}_videos"]} if f"{self.name}_videos" in results else {}),
                "sampling": results[f"{self.name}_sample"],
                **({"fit": results[f"{self.name}_fit"]} if f"{self.name}_fit" in results else {}),
            },
        )


def step_name(family: str, phase: str, phases: list) -> str:
    return f"{family}_train" if len(phases) == 1 else f"{family}_train_{phase}"


def check_targets(name: str) -> None:
    """A family's targets.yaml names known goals with numbers, else one line naming the file."""
    from demo.evaluation import GOALS

    path = family_folder(name) / "targets.yaml"
    goals = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(goals) - set(GOALS)) if isinstance(goals, dict) else ["(not a mapping)"]
    if unknown or not all(isinstance(v, (int, float)) for v in goals.values()):
        raise ConfigError(f"{path}: goals must be numbers keyed by {list(GOALS)}; got {unknown or goals}")


def family_steps(name: str, after: str) -> list[Step]:
    """The steps of family `name`, the first building on the demo's step `after` (its videos and
    tokenizers), each on the one before; a stage's (stage.yaml) first training phase on the demo
    model it starts from too, its sampling on the hierarchy's."""
    check_targets(name)
    folder, phases, stage = family_folder(name), family_phases(name), family_stage(name)

    def run(method: str, *args):
        return lambda demo: getattr(FamilySteps(demo, name), method)(*args)

    def file(path) -> str:  # a settings file, named from the checkout's root where it lies there
        path = folder / path
        return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)

    first: list[Step] = []  # what comes before the shards, which build on it
    if family_fit(name):  # the shards are written with what it fits
        first = [
            Step(
                f"{name}_fit",
                run("fit"),
                (file(FIT_FILE), f"fit.families.{name}"),
                (f"{name}/fit", f"{name}/fit.yaml"),
                (after,),
            )
        ]
    if stage and (stage["video_scale"] != 1 or stage["num_videos"]):
        first = [Step(f"{name}_videos", run("videos"), (file(STAGE_FILE),), (f"{name}/videos",), (after,))]
    shards_uses = (file("prep.yaml"), f"{file(phases[0][1])}:model")  # not the training settings
    if stage and not first:
        shards_uses += (file(STAGE_FILE),)
    shards = Step(
        f"{name}_shards",
        run("shards"),
        shards_uses,
        (f"{name}/shards", f"{name}/prep.yaml"),
        after=None if first else (after,),
    )
    train = [
        Step(
            step_name(name, phase, phases),
            run("train", phase),
            (file(config), "train.ranks", "train.threads_per_rank", f"train.families.{name}"),
            (f"{name}/runs/{phase}", f"{name}/models/{phase}"),
            # a stage's first phase starts from one of the demo's models: it builds on its step too
            after=(shards.name, stage["init"]) if stage and index == 0 else None,
        )
        for index, (phase, config) in enumerate(phases)
    ]
    sample_uses = ("sample.durations", "sample.seeds", "sample.seen_prompts", file("sample.yaml"))
    return [
        *first,
        shards,
        *train,
        Step(
            f"{name}_sample",
            run("sample"),
            (*sample_uses, f"sample.families.{name}", *(("sample.options",) if stage else ())),
            (f"{name}/samples",),
            after=(train[-1].name, "sample") if stage else None,
        ),
        Step(f"{name}_evaluate", run("evaluate"), ("eval", file("targets.yaml")), (f"{name}/eval",)),
    ]
