"""DeepSpeed ZeRO-0/1/2/3 checkpoints -> full fp32 weights (and Adam moments) in our format.

Reads DeepSpeed's files directly (layout as in deepspeed 0.19's ``utils/zero_to_fp32.py``):

* ZeRO-0 (the trainer's GuardedAdamW): ``mp_rank_XX_model_states.pt`` alone, one per TP rank:
  ``module`` (the weights, in the run's precision) and ``optimizer`` (torch's optimizer
  state_dict, whose param groups name their parameters: ``param_names``; in bf16 runs also the
  fp32 ``master_weights``, in the order of the state's indices);
* ``mp_rank_XX_model_states.pt`` (ZeRO-1/2) or ``zero_pp_rank_D_mp_rank_XX_model_states.pt``
  (ZeRO-3): ``param_shapes`` (one ordered dict per param group), ``frozen_param_shapes`` /
  ``frozen_param_fragments`` (ZeRO-3) and ``module`` (ZeRO-1/2: also the frozen params);
* ``[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt``: the fp32 master weights of DP rank D.
  ZeRO-1/2: each group's flat vector (params in order, each followed by its alignment padding)
  is cut into consecutive DP partitions (``single_partition_of_fp32_groups``). ZeRO-3: every
  param is cut into DP pieces of ceil(numel / DP); rank D's pieces follow one another through
  its ``fp32_flat_groups``. Adam's ``exp_avg`` / ``exp_avg_sq`` lie exactly like the weights.

Memory stays bounded: the files are memory-mapped and re-opened for each output chunk, so the
pages read are released chunk by chunk; one tensor at a time is gathered (and merged over TP).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from cogvideo.checkpoint.format import ADAM_KEYS, full_shapes, plan_of, write_checkpoint
from cogvideo.checkpoint.io import DEFAULT_SHARD_BYTES, CheckpointError, load_pt, runs_of
from cogvideo.checkpoint.training import (
    COMPLETE,
    EMA_PREFIX,
    MODEL_FILE,
    OPTIM_FILE,
    ema_shards,
    engine_dirs,
    summarize,
    tag_dir,
    train_config_model,
    train_config_text_format,
    verify_tag,
)
from cogvideo.tp_plan import TPPlan

DROPPED = ["learning-rate scheduler state", "loss scaler", "data loader positions", "RNG states"]


class ZeroCheckpoint:
    """One DeepSpeed checkpoint (all TP x DP ranks) of a model that shards by `plan`.
    ``tensors()`` yields full fp32 tensors."""

    def __init__(self, path: str | Path, plan: TPPlan, tag: str | None = None):
        self.path, self.plan = tag_dir(Path(path), tag), plan
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        if (self.path / COMPLETE).is_file() and (problems := verify_tag(self.path)):
            raise CheckpointError(summarize(problems))  # our trainer's: every file against its digest
        optim = {(int(m[2]), int(m[1])): f for f in self.path.iterdir() if (m := OPTIM_FILE.match(f.name))}
        models = {
            (int(m[2]), int(m[1] or 0)): f for f in self.path.iterdir() if (m := MODEL_FILE.match(f.name))
        }
        if not models:
            raise CheckpointError(
                f"{self.path}: no DeepSpeed checkpoint here (needs *_model_states.pt files, and "
                f"*_optim_states.pt files for ZeRO-1/2/3)"
            )
        self.tp = max(t for t, _ in models) + 1
        self.optim_files = optim
        first = load_pt(models[(0, 0)], mmap=True)
        if "param_shapes" not in first:
            raise CheckpointError(f"{models[(0, 0)]}: no param_shapes (not a DeepSpeed model state file)")
        self.iteration = int(first.get("global_steps") or 0)
        if not optim:  # ZeRO-0: the optimizer's own state_dict lies in the model states file
            self.stage, self.dp, self.stage3 = 0, int(first.get("dp_world_size") or 1), False
            self.model_files = models
            self.ranks = [self._stage0_layout(t) for t in range(self.tp)]
            self.shapes = full_shapes(plan, self.ranks[0]["shapes"], self.tp)
            return
        header = load_pt(optim[(0, 0)], mmap=True).get("optimizer_state_dict", {})
        if "zero_stage" not in header:
            raise CheckpointError(f"{optim[(0, 0)]}: no zero_stage (not a ZeRO optimizer state file)")
        self.stage = int(header["zero_stage"])
        counts = header["partition_count"]
        self.dp = max(counts) if isinstance(counts, list) else int(counts)
        self.stage3 = self.stage == 3
        expected = [(t, d) for t in range(self.tp) for d in range(self.dp)]
        missing = [k for k in expected if k not in optim] + [
            k for k in expected if self.stage3 and k not in models
        ]
        missing += [(t, 0) for t in range(self.tp) if (t, 0) not in models]
        if missing:
            raise CheckpointError(
                f"{self.path}: missing rank files for (tp, dp) ranks {sorted(set(missing))} "
                f"(ZeRO-{self.stage}, TP={self.tp}, DP={self.dp})"
            )
        self.model_files = models
        self.ranks = [self._layout(t) for t in range(self.tp)]
        names = list(self.ranks[0]["shapes"])
        for t, rank in enumerate(self.ranks[1:], start=1):
            if list(rank["shapes"]) != names:
                raise CheckpointError(
                    f"{self.path}: TP rank {t} holds other parameters than rank 0: "
                    f"{sorted(set(rank['shapes']) ^ set(names))[:20]}"
                )
        self.shapes = full_shapes(plan, self.ranks[0]["shapes"], self.tp)

    # ---- layout -------------------------------------------------------------------------
    def _layout(self, t: int) -> dict:
        """Where each parameter of TP rank t lives: its shape, and (group, offset) in the flat
        fp32 vectors, or "frozen"."""
        model = load_pt(self.model_files[(t, 0)], mmap=True)
        groups = model["param_shapes"]
        shapes, where = {}, {}
        optim = self._open(t)["optim"]
        group_starts = None
        if self.stage3:
            sizes = [g.numel() for g in optim[0]["fp32_flat_groups"]]
            offset = 0
            for group in groups:
                for name, shape in group.items():
                    shapes[name], where[name] = tuple(shape), offset
                    offset += -(-math.prod(shape) // self.dp)
            if offset > sum(sizes):
                raise CheckpointError(
                    f"{self.path}: TP rank {t}: parameters need {offset} elements per DP rank, "
                    f"the optimizer files hold {sum(sizes)}"
                )
            group_starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        else:
            paddings = optim[0].get("param_alignment_paddings")
            for g, group in enumerate(groups):
                offset = 0
                for i, (name, shape) in enumerate(group.items()):
                    shapes[name], where[name] = tuple(shape), (g, offset)
                    offset += math.prod(shape) + (paddings[g][i] if paddings else 0)
                available = sum(
                    optim[d]["single_partition_of_fp32_groups"][g].numel() for d in range(self.dp)
                )
                if offset > available:
                    raise CheckpointError(
                        f"{self.path}: TP rank {t} group {g}: parameters need {offset} "
                        f"elements, the DP partitions hold {available}"
                    )
        # megatron layers put non-tensor "_extra_state" entries into the module state
        module = {n: v for n, v in model["module"].items() if torch.is_tensor(v)}
        frozen = model.get("frozen_param_shapes") or {}
        if not self.stage3:
            frozen = {n: tuple(v.shape) for n, v in module.items() if n not in shapes} | dict(frozen)
        for name, shape in frozen.items():
            shapes[name], where[name] = tuple(shape), "frozen"
        order = [n for n in module if n in shapes] + [n for n in shapes if n not in module]
        return {"shapes": {n: shapes[n] for n in order}, "where": where, "group_starts": group_starts}

    def _stage0_layout(self, t: int) -> dict:
        """ZeRO-0 (one rank file per TP rank; DP ranks hold copies): the module's tensors, each
        trained one found by its name in the optimizer's param groups (pretrain.optim's
        GuardedAdamW names them)."""
        file = self.model_files.get((t, 0))
        if file is None:
            raise CheckpointError(f"{self.path}: missing the model states file of TP rank {t} (ZeRO-0)")
        model = load_pt(file, mmap=True)
        optimizer = model.get("optimizer") or {}
        groups = optimizer.get("param_groups") or []
        if not groups or any("param_names" not in g for g in groups):
            raise CheckpointError(
                f"{file}: a ZeRO-0 checkpoint whose optimizer state does not name its parameters "
                "(written by a trainer other than pretrain.train); it cannot be read by name"
            )
        where = {
            name: ("adam", index)
            for g in groups
            for name, index in zip(g["param_names"], g["params"], strict=True)
        }
        module = {n: v for n, v in model["module"].items() if torch.is_tensor(v)}
        missing = sorted(set(where) - set(module))
        if missing:
            raise CheckpointError(f"{file}: optimizer parameters missing from the module: {missing[:20]}")
        shapes = {n: tuple(v.shape) for n, v in module.items()}
        where |= {n: "frozen" for n in module if n not in where}
        return {"shapes": shapes, "where": where, "group_starts": None}

    def _open(self, t: int) -> dict:
        """The optimizer and model states of every DP rank of TP rank t, memory-mapped."""
        models = [load_pt(self.model_files[(t, d)], mmap=True) for d in range(self.dp if self.stage3 else 1)]
        if self.stage == 0:
            return {"optim": [models[0]["optimizer"]], "model": models}
        optim = [load_pt(self.optim_files[(t, d)], mmap=True)["optimizer_state_dict"] for d in range(self.dp)]
        return {"optim": optim, "model": models}

    # ---- reading ------------------------------------------------------------------------
    def _flat(self, state: dict, g: int, kind: str) -> torch.Tensor:
        if kind == "fp32":
            return state["fp32_flat_groups" if self.stage3 else "single_partition_of_fp32_groups"][g]
        inner = state["optimizer_state_dict" if self.stage3 else "base_optimizer_state"]["state"]
        return inner[g][kind]

    def _read(self, t: int, files: dict, name: str, kind: str) -> torch.Tensor:
        """One full (DP-gathered) tensor of TP rank t, copied once out of the mapped files."""
        layout, optim = self.ranks[t], files["optim"]
        shape, where = layout["shapes"][name], layout["where"][name]
        numel = math.prod(shape)
        out = torch.empty(numel, dtype=torch.float32)
        if where == "frozen" and kind != "fp32":
            raise CheckpointError(f"{name}: frozen, has no optimizer state")
        if self.stage == 0:  # whole tensors: the fp32 masters (bf16 runs; else the module's), the moments
            masters = optim[0].get("master_weights")
            if kind != "fp32":
                source = optim[0]["state"][where[1]][kind]
            elif masters is not None and where != "frozen":
                source = masters[where[1]]
            else:
                source = files["model"][0]["module"][name]
            return out.copy_(source.flatten()).reshape(shape)
        if where == "frozen":
            if not self.stage3:
                return out.copy_(files["model"][0]["module"][name].flatten()).reshape(shape)
            segments = [m["frozen_param_fragments"][name].flatten() for m in files["model"]]
        elif self.stage3:  # rank d holds elements [d * piece, (d + 1) * piece) of the padded param
            piece = -(-numel // self.dp)
            starts = layout["group_starts"]
            segments = [
                self._flat(state, g, kind)[lo - starts[g] : hi - starts[g]]
                for state in optim
                for g in range(len(starts) - 1)
                if (lo := max(where, starts[g])) < (hi := min(where + piece, starts[g + 1]))
            ]
        else:  # the group's flat vector runs through the DP partitions one after another
            g, offset = where
            segments, start = [], 0
            for state in optim:
                part = state["single_partition_of_fp32_groups"][g].numel()
                lo, hi = max(offset, start), min(offset + numel, start + part)
                if lo < hi:
                    segments.append(self._flat(state, g, kind)[lo - start : hi - start])
                start += part
        filled = 0
        for segment in segments:
            take = min(segment.numel(), numel - filled)  # ZeRO-3 pads the last piece
            out[filled : filled + take].copy_(segment[:take])
            filled += take
        if filled != numel:
            raise CheckpointError(
                f"{self.path}: {name} (TP rank {t}) has {filled} of {numel} elements in the files"
            )
        return out.reshape(shape)

    def _merged(self, files: list[dict], name: str, kind: str) -> torch.Tensor:
        """The full tensor: its TP parts, read and merged (and freed once merged)."""
        return self.plan.merge_tensor(name, [self._read(t, files[t], name, kind) for t in range(self.tp)])

    def tensors(
        self, kind: str = "fp32", names: list[str] | None = None, chunk_bytes: int = DEFAULT_SHARD_BYTES
    ):
        """Yield (name, full tensor merged over TP) of `kind` ("fp32", "exp_avg", "exp_avg_sq"),
        re-opening the memory-mapped files every `chunk_bytes` of output."""
        names = list(self.shapes) if names is None else names
        for run in runs_of(names, lambda name: 4 * math.prod(self.shapes[name]), chunk_bytes):
            files = [self._open(t) for t in range(self.tp)]
            for name in run:
                yield name, self._merged(files, name, kind)
            del files  # unmaps the pages read for this run

    def optimizer_summary(self, trainable: list[str]) -> dict:
        state = self._open(0)["optim"][0]
        inner = (
            state
            if self.stage == 0
            else state["optimizer_state_dict" if self.stage3 else "base_optimizer_state"]
        )
        steps = [s.get("step") for s in inner["state"].values() if "step" in s]
        groups = [
            {k: v for k, v in g.items() if k in ("lr", "betas", "eps", "weight_decay")}
            for g in inner["param_groups"]
        ]
        step = int(steps[0]) if steps else 0
        return {
            "step": step,
            "param_groups": groups,
            "params": trainable,
            "source": f"DeepSpeed ZeRO-{self.stage} TP={self.tp} DP={self.dp}",
            "dropped": DROPPED,
        }


def convert_zero(
    src: str | Path,
    dst: str | Path,
    cfg=None,
    *,
    tag: str | None = None,
    optimizer: bool = True,
    ema: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    **write,
) -> Path:
    """Consolidate a ZeRO checkpoint (any TP x DP layout) into our format. `cfg`: the model
    (default: the one its train_config.yaml records). `write`: `write_checkpoint`'s
    tensor_parallel, force, dtype, vocab_size.

    With `optimizer`, Adam's moments and step go to ``optimizer/`` (full tensors), loadable at
    any TP/DP layout; what the new layout cannot reuse is listed in its state.json ("dropped").
    A run that kept an average of its weights (optim.ema_decay) exports the average as the
    model's weights (what diffusers' pipelines sample with), without the Adam moments (they
    belong to the raw weights); `ema=False` exports the raw weights and their moments."""
    path = tag_dir(Path(src), tag)
    cfg = cfg or train_config_model(path)
    dirs = engine_dirs(path, cfg)
    if len(dirs) > 1:
        return _convert_parts(path, dst, cfg, dirs, max_shard_bytes, ema, **write)
    zero = ZeroCheckpoint(src, plan_of(cfg), tag)
    averages = ema_shards(zero.path, zero.tp) if ema else None
    moments = None
    if optimizer and averages is None:
        trainable = [n for n in zero.shapes if zero.ranks[0]["where"][n] != "frozen"]
        state = zero.optimizer_summary(trainable)
        stream = (
            (f"{kind}.{name}", t)
            for kind in ADAM_KEYS
            for name, t in zero.tensors(kind, trainable, max_shard_bytes)
        )
        moments = (state, stream)
    source = f"DeepSpeed ZeRO-{zero.stage} checkpoint {zero.path} (TP={zero.tp}, DP={zero.dp})"
    return write_checkpoint(
        dst,
        cfg,
        zero.shapes,
        averaged(zero.tensors("fp32", chunk_bytes=max_shard_bytes), averages, zero.plan),
        iteration=zero.iteration,
        max_shard_bytes=max_shard_bytes,
        optimizer=moments,
        source=source + (", its average of the weights (EMA)" if averages else ""),
        text_format=train_config_text_format(zero.path),
        **write,
    )


def averaged(stream, averages: list[dict] | None, plan):
    """(name, tensor) pairs with each trained tensor replaced by its average (merged over the TP
    shards by `plan`), when the checkpoint kept one."""
    for name, tensor in stream:
        key = EMA_PREFIX + name
        if averages is not None and key in averages[0]:
            tensor = plan.merge_tensor(name, [shard[key].float() for shard in averages])
        yield name, tensor


class PrefixedPlan:
    """A TP plan seen from a submodule: its parameter names without the submodule's prefix."""

    def __init__(self, plan: TPPlan, prefix: str):
        self.plan, self.prefix = plan, prefix

    def rule(self, name: str):
        return self.plan.rule(self.prefix + name)

    def full_shape(self, name: str, local_shape, size: int):
        return self.plan.full_shape(self.prefix + name, local_shape, size)

    def merge_tensor(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        return self.plan.merge_tensor(self.prefix + name, parts)


def _convert_parts(path: Path, dst, cfg, dirs, max_shard_bytes: int, ema: bool, **write) -> Path:
    """A model trained as several optimised parts: each part's engine consolidated, its names
    prefixed with the part's module, one checkpoint of the whole model. The parts' Adam moments
    are not exported (each part has its own step; resume such a run from its training checkpoint)."""
    zeros = [(prefix, ZeroCheckpoint(folder, PrefixedPlan(plan_of(cfg), prefix))) for prefix, folder in dirs]
    shapes = {prefix + name: shape for prefix, zero in zeros for name, shape in zero.shapes.items()}
    stream = (
        (prefix + name, tensor)
        for prefix, zero in zeros
        for name, tensor in zero.tensors(chunk_bytes=max_shard_bytes)
    )
    first = zeros[0][1]
    averages = ema_shards(path, first.tp) if ema else None
    return write_checkpoint(
        dst,
        cfg,
        shapes,
        averaged(stream, averages, plan_of(cfg)),
        iteration=sum(zero.iteration for _, zero in zeros),
        max_shard_bytes=max_shard_bytes,
        optimizer=None,
        source=(
            f"DeepSpeed ZeRO-{first.stage} checkpoint {path} (TP={first.tp}, DP={first.dp}), "
            f"optimised parts {[folder.name for _, folder in dirs]}"
        ),
        text_format=train_config_text_format(path),
        **write,
    )


def restore_optimizer_state(engine, path: str | Path, tp_rank: int = 0, tp_size: int = 1) -> int:
    """Put the Adam moments and step saved in our checkpoint `path` into a DeepSpeed engine of
    any ZeRO stage (0 to 3) and TP x DP layout (after ``deepspeed.initialize``, with the model weights
    loaded from ``load_model_state`` before it). Collective under ZeRO-3. Returns the step."""
    from deepspeed.utils import safe_set_full_optimizer_state

    from cogvideo.checkpoint.format import load_optimizer_state

    state = load_optimizer_state(path, tp_rank, tp_size)
    trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    missing = [n for n in trainable if n not in state["exp_avg"]]
    extra = [n for n in state["exp_avg"] if n not in trainable]
    if missing or extra:
        raise CheckpointError(
            f"{path}: optimizer state does not fit the model's trainable parameters: "
            f"missing {missing[:20]}, not trainable here {extra[:20]}"
        )
    step = int(state["state"]["step"])
    if engine.zero_optimization_stage() == 0:  # DeepSpeed steps the torch optimizer as it is
        optimizer = engine.optimizer  # its parameters, by name: the model's own or their fp32 masters
        for group in optimizer.param_groups:
            for name, param in zip(group["param_names"], group["params"], strict=True):
                optimizer.state[param] = {
                    "step": torch.tensor(float(step)),
                    **{key: state[key][name].to(param.dtype).clone() for key in ADAM_KEYS},
                }
        return step
    # Adam creates its state at the first step; create it now (zeros, then overwritten below) on
    # the flat fp32 partitions the ZeRO optimizer hands to torch's AdamW
    inner = engine.optimizer.optimizer
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3: its sub-groups
    if flats is None:
        flats = [flat for group in inner.param_groups for flat in group["params"]]
    for flat in flats:
        inner.state[flat] = {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 point each parameter's fragment at those states once
        link()
    for name, param in trainable.items():
        for key in ADAM_KEYS:
            safe_set_full_optimizer_state(param, state[key][name], key)
    return step
