"""`cogvideo-sample`: sample videos for every prompt of a file.

cogvideo-sample --prompts prompts.txt --out samples/ --config sample.yaml seed=7 stage1_guidance=2.5
cogvideo-sample --prompts prompts.txt --out samples/ --ray [--address auto] workers=8 device=cuda
torchrun --nproc-per-node 2 -m cogvideo.sampling.cli --prompts p.txt --out s/ tensor_parallel=2
cogvideo-sample --family hpdm --prompts prompts.txt --out s/ checkpoint=ckpt/ text_tokenizer=text.model

The options are the family's (`--family`, CogVideo's by default; `--help` lists them): its
sampler (`ModelFamily.sampler`, "module:Class") names the pipeline class, whose `options_class`
they are and whose `load(options)` builds it. Every family's pipeline runs in the same job (resume, Ray actors, records, manifest).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cogvideo.configio import ConfigError, config_parser, load_config
from cogvideo.raystart import RayStartError
from cogvideo.sampling.job import run_job
from cogvideo.sampling.options import OptionsError, check_options
from cogvideo.sampling.prompts import PromptError, read_prompts


def family_pipeline(name: str):
    """The pipeline class a family samples with: its `sampler` ("module:Class"), a class with
    `options_class` and `load(options)`."""
    from cogvideo.family import get_family

    family = get_family(name)
    target = None
    if family.sampler is not None:
        module, attribute = family.sampler.split(":")
        target = getattr(importlib.import_module(module), attribute)
    if not hasattr(target, "options_class"):
        raise ValueError(f"--family {name}: this family has no cogvideo-sample pipeline")
    return target


def main(argv: list[str] | None = None) -> int:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--family", default="cogvideo")
    try:
        pipeline = family_pipeline(first.parse_known_args(argv)[0].family)
    except ValueError as err:
        print(f"cogvideo-sample: {err}", file=sys.stderr)
        return 2
    options_class = pipeline.options_class
    parser = config_parser(options_class, "cogvideo-sample", "Sample videos for a file of prompts")
    parser.add_argument("--family", default="cogvideo", help="the model family sampled (its options below)")
    parser.add_argument(
        "--prompts", required=True, help="one prompt per line, or .jsonl with prompt/first_frame"
    )
    parser.add_argument("--out", required=True, help="output folder (rerun to resume)")
    parser.add_argument("--ray", action="store_true", help="sample on Ray actors (options.workers of them)")
    parser.add_argument("--address", help="Ray cluster address (default: start a local one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        options = load_config(options_class, args.config, args.overrides)
    except (ConfigError, ValueError) as err:  # an unknown key or a bad value: nothing else can be checked
        print(f"cogvideo-sample: {err}", file=sys.stderr)
        return 2
    problems = []
    try:
        check_options(options)
    except OptionsError as err:
        problems += str(err).splitlines()
    try:
        prompt_file = read_prompts(args.prompts)
    except PromptError as err:
        problems.append(str(err))
    if problems:  # all of them at once, before any model, process group or Ray starts
        for problem in problems:
            print(f"cogvideo-sample: {problem}", file=sys.stderr)
        return 2
    try:
        manifest = run_job(
            prompt_file.prompts,
            args.out,
            options,
            pipeline.load,
            pipeline.precision,
            use_ray=args.ray,
            address=args.address,
        )
    except (FileNotFoundError, ValueError) as err:  # unreadable checkpoint, mismatched stages, other options
        print(f"cogvideo-sample: {err}", file=sys.stderr)
        return 2
    except RayStartError as err:
        print(f"cogvideo-sample: {err}", file=sys.stderr)
        return 1
    return 0 if manifest is None else report(args.out, manifest, prompt_file.skipped())


def report(out: str, manifest: dict, skipped: str = "") -> int:
    """The run's summary with every failure's reason and the prompt file's skipped lines; non-zero
    when any prompt failed (a rerun samples only those)."""
    print(
        f"{out}: {manifest['ok']} of {manifest['prompts']} prompts sampled, {manifest['failed']} failed"
        + (f"; {skipped}" if skipped else "")
    )
    for entry in manifest["entries"]:
        if entry["status"] != "ok":
            print(f"  {entry['key']}: {entry['status']}: {entry.get('error', 'no record (interrupted?)')}")
    return 1 if manifest["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
