"""Hierarchical flow with fake stage models whose output is a known function of what they
are fed: frame order, interleaving, given frames untouched, texts and flags per pass."""

import pytest
import torch

from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.hierarchy import HierarchicalSampler, window_layout
from cogvideo.models.cogvideo.options import SampleOptions
from cogvideo.models.cogvideo.stage_model import StageModel
from cogvideo.sampling.prompts import TextBudgetError
from cogvideo.sampling.strategies import TopKStrategy
from cogvideo.text_format import TextFormat

GREEDY = TopKStrategy(temperature=0)


class FakeStage(StageModel):
    """Follows the chunked-decoding contract; records every call.

    stage 1: frame f, position p -> code 8 f + p (frame 0: p).
    stage 2: slot s, position p -> the mean of the given frames left and right of the slot
    at p, read back from the fed [BOI, t0 .. t(n-2)] blocks (t(n-1) = t(n-2) + 1 here)."""

    def __init__(self, cfg):
        super().__init__(torch.nn.Linear(1, 1), cfg)
        self.calls = []

    def new_cache(self, temporal):
        return {"frames": {}, "temporal": temporal}

    def text(self, ids, cache, text_bias):
        self.calls.append(("text", ids.clone(), cache["temporal"], text_bias))

    def given(self, frames, cache, text_bias):
        self.calls.append(("given", list(frames), text_bias))
        cache["frames"].update({f: self.frame_input(codes) for f, codes in frames.items()})

    def _given_code(self, cache, frame, p):
        block = cache["frames"][frame]
        return block[:, p + 1] if p + 1 < self.n else block[:, p] + 1

    def step(self, tokens, frame_index, start, cache, text_bias):
        self.calls.append(("step", frame_index, start, tokens.shape[1], cache["temporal"], text_bias))
        batch = len(tokens)
        logits = torch.zeros(batch, tokens.shape[1], self.cfg.vocab.num_image_tokens)
        for i in range(tokens.shape[1]):
            p = start + i
            if self.cfg.stage == "stage2":
                code = (
                    self._given_code(cache, frame_index - 1, p) + self._given_code(cache, frame_index + 1, p)
                ) // 2
            else:
                code = torch.full((batch,), 8 * frame_index + p)
            logits[torch.arange(batch), i, code] = 1.0
        return logits


def encode_fake(cfg, log):
    def encode(text):
        log.append(text)
        return torch.full((cfg.text_length,), cfg.vocab.text_offset + (len(text) % 50))

    return encode


def make_sampler(levels=3, guidance=1.0):
    cfg1, cfg2 = get_preset("tiny"), get_preset("tiny-stage2")
    options = SampleOptions(interpolation_levels=levels, stage1_guidance=guidance, duration=4.0)
    texts = []
    sampler = HierarchicalSampler(
        FakeStage(cfg1),
        FakeStage(cfg2),
        options,
        encode_fake(cfg1, texts),
        {"frame0": GREEDY, "stage1": GREEDY, "stage2": GREEDY},
    )
    return sampler, texts


def test_window_layout_doubles_the_frames():
    assert [window_layout(n, 5) for n in (5, 9, 17)] == [(2, 9), (4, 17), (8, 33)]


def test_every_frame_lands_at_its_time_index():
    sampler, texts = make_sampler()
    video = sampler.sample(["a cat", "a dog"])
    n = sampler.stage1.n
    assert video.shape == (2, 33, n)
    # keyframe k holds 8k + p and sits at time 8k; each level writes the midpoint of its
    # neighbours, so frame t must hold t + p if and only if it went to the right index
    expected = torch.arange(33)[:, None] + torch.arange(n)[None, :]
    assert torch.equal(video[0], expected) and torch.equal(video[1], expected)
    # stage-2 durations halve per level: 2.0, 1.0, 0.5 s windows; stage 1 spans 4.0 s
    durations = {float(text.split("秒<n>")[0]) for text in texts if "秒<n>" in text}
    assert sorted(durations) == [0.5, 1.0, 2.0, 4.0]
    # unguided, as the release: stage 1 and stage 2 read the bare prompt (no " 视频")
    assert {text.split("<n>")[1] for text in texts if "<n>" in text} == {"a cat", "a dog"}


def test_stage2_never_changes_a_given_frame_and_batches_a_level():
    sampler, _ = make_sampler()
    n = sampler.stage1.n
    frames = torch.randint(0, 32, (2, 5, n)) * 2
    out = sampler.interpolate(["x", "y"], frames, level=0)
    assert torch.equal(out[:, 0::2], frames)
    midpoints = (frames[:, :-1] + frames[:, 1:]) // 2
    midpoints[..., -1] = midpoints[..., -2] + 1  # the fake's guess for the never-fed last token
    assert torch.equal(out[:, 1::2], midpoints)
    stage2 = sampler.stage2
    text_calls = [c for c in stage2.calls if c[0] == "text"]
    assert len(text_calls) == 1 and len(text_calls[0][1]) == 2 * 2  # 2 prompts x 2 windows, one pass
    assert [c[1] for c in stage2.calls if c[0] == "given"] == [[0, 2, 4]]  # one parallel pass
    steps = [c[1:4] for c in stage2.calls if c[0] == "step"]
    assert steps == [(f, p, 1) for f in (1, 3) for p in range(n)]  # then one token per step


def test_one_window_at_a_time_gives_the_same_video():
    sampler, _ = make_sampler()
    frames = torch.randint(0, 32, (2, 5, sampler.stage1.n)) * 2
    assert torch.equal(
        sampler.interpolate(["x", "y"], frames, 0),
        sampler.interpolate(["x", "y"], frames, 0, windows_per_pass=1),
    )


def test_flags_per_pass_and_user_first_frame():
    sampler, texts = make_sampler(levels=0, guidance=3.0)
    n = sampler.stage1.n
    given = torch.randint(0, 64, (n,))
    video = sampler.sample(["a cat", "a dog"], [given, None])
    assert torch.equal(video[0, 0], given)  # the user's frame, untouched
    assert torch.equal(video[1, 0], torch.arange(n))
    calls = [c for c in sampler.stage1.calls if c[0] == "text"]
    frame0, stage1 = calls
    assert len(frame0[1]) == 1 and frame0[2] is False and frame0[3] == 1.4  # only the prompt without a frame
    assert len(stage1[1]) == 4 and stage1[2] is True and stage1[3] == 0.0  # cond + uncond rows
    # the release's texts (cogvideo_pipeline.py): frame 0 prompt + " 高清摄影"; stage 1 guided
    # str(float(duration)) + "秒" <n> prompt + " 视频", guided by the same prefix + "视频"
    assert "a dog 高清摄影" in texts and "4.0秒<n>a cat 视频" in texts and "4.0秒<n>视频" in texts


class OffsetStage(FakeStage):
    """A one-frame model drawing code p + 5 at position p."""

    def step(self, tokens, frame_index, start, cache, text_bias):
        return torch.roll(super().step(tokens, frame_index, start, cache, text_bias), 5, dims=-1)


def test_a_frame0_model_draws_frame_0_and_stage_1_the_rest():
    cfg1 = get_preset("tiny")
    stage1, frame0 = FakeStage(cfg1), OffsetStage(cfg1.replace(stage="backbone", num_frames=1))
    sampler = HierarchicalSampler(
        stage1,
        None,
        SampleOptions(interpolation_levels=0),
        encode_fake(cfg1, []),
        {"frame0": GREEDY, "stage1": GREEDY, "stage2": GREEDY},
        frame0=frame0,
    )
    video = sampler.sample(["a cat"])
    n = stage1.n
    assert torch.equal(video[0, 0], torch.arange(n) + 5)
    assert torch.equal(video[0, 1:], 8 * torch.arange(1, 5)[:, None] + torch.arange(n))
    assert [c[2] for c in frame0.calls if c[0] == "text"] == [False]  # temporal channel off
    assert [c[2] for c in stage1.calls if c[0] == "text"] == [True]  # stage 1 only for keyframes


def test_frame0_reads_the_duration_prefix_only_when_asked_and_trained_on_it():
    cfg1 = get_preset("tiny")
    frame0 = OffsetStage(cfg1.replace(stage="backbone", num_frames=1))  # the release's text format

    def sampler(**options):
        texts = []
        made = HierarchicalSampler(
            FakeStage(cfg1),
            None,
            SampleOptions(interpolation_levels=0, duration=2.0, frame0_suffix="", **options),
            encode_fake(cfg1, texts),
            {"frame0": GREEDY, "stage1": GREEDY, "stage2": GREEDY},
            frame0=frame0,
        )
        made.sample(["a cat"])
        return texts

    assert sampler()[0] == "a cat"  # the release's frame-0 pass: the prompt alone
    assert sampler(frame0_duration_prefix=True)[0] == "2.0秒<n>a cat"  # the stage-1 prompt's duration
    frame0.text_format = TextFormat(prefix_template="{caption}")
    with pytest.raises(ValueError, match="frame0_duration_prefix: the frame-0 model was trained without"):
        sampler(frame0_duration_prefix=True)


class WordEncoder:
    """One id per space-separated word, refusing more than `budget` words (TextEncoder's rule)."""

    def __init__(self, cfg, budget):
        self.cfg, self.budget, self.seen = cfg, budget, []

    def __call__(self, text):
        self.seen.append(text)
        words = text.split()
        if len(words) > self.budget:
            raise TextBudgetError(f"{len(words)} words > {self.budget}")
        return torch.full((self.cfg.text_length,), self.cfg.vocab.text_offset + len(words))


def test_a_suffix_over_the_text_budget_is_dropped_and_said_or_refused():
    cfg1, cfg2 = get_preset("tiny"), get_preset("tiny-stage2")
    encode = WordEncoder(cfg1, budget=4)
    options = SampleOptions(
        interpolation_levels=1, stage1_guidance=3.0, frame0_suffix=" 高清 摄影", video_suffix=" 视频"
    )
    sampler = HierarchicalSampler(
        FakeStage(cfg1),
        FakeStage(cfg2),
        options,
        encode,
        {"frame0": GREEDY, "stage1": GREEDY, "stage2": GREEDY},
    )
    texts, notes = sampler.texts("a red ball")  # 3 words: + 2 for frame 0 is over 4, + 1 for stage 1 fits
    assert texts[:2] == ["a red ball", "4.0秒<n>a red ball 视频"]
    assert len(notes) == 1 and notes[0].startswith("frame0_suffix ' 高清 摄影' dropped (5 words > 4)")
    sampler.sample(["a red ball"])
    assert "a red ball" in encode.seen and "a red ball 高清 摄影" not in encode.seen[-6:]
    sampler.options = SampleOptions(
        interpolation_levels=1, frame0_suffix=" 高清 摄影", suffix_over_budget="error"
    )
    texts, notes = sampler.texts("a red ball")
    assert texts[0] == "a red ball 高清 摄影" and not notes
    with pytest.raises(TextBudgetError):
        encode(texts[0])


# ---- real models against a greedy reference of the release's recipe, stage by stage -------------


def char_encoder(cfg):
    """A text -> left-padded ids [text_length] (one id per character, the last text_length kept)."""

    def encode(text):
        ids = [cfg.vocab.text_offset + ord(c) % cfg.vocab.num_text_tokens for c in text][-cfg.text_length :]
        return torch.tensor([cfg.vocab.pad_id] * (cfg.text_length - len(ids)) + ids)

    return encode


def real_stage(preset, seed):
    """A tiny model with spread logits (init_std 0.3) in float64, so greedy choices are clear;
    2 x 2 tokens per frame (stage 2: one 2 x 2 window, shifted by 1 on odd layers) keep it quick."""
    cfg = get_preset(preset).replace(init_std=0.3, frame_tokens=2, frame_size=8)
    torch.manual_seed(seed)
    return StageModel(build_model(cfg).double().eval(), cfg)


def greedy_reference(stage, text, given, targets, temporal=True, bias=0.0, uncond=None, guidance=1.0):
    """One pass written out: full forwards over the time-ordered sequence, one per token; guided
    passes take lu + guidance * (lc - lu) from the unconditional text's rows."""
    encode, cfg = char_encoder(stage.cfg), stage.cfg
    T, n = cfg.text_length, cfg.tokens_per_frame
    texts = [encode(text)] + ([encode(uncond)] if uncond is not None else [])
    frames = {f: codes.clone() for f, codes in given.items()} | {
        f: torch.zeros(n, dtype=torch.long) for f in targets
    }
    for f in targets:
        for p in range(n):
            blocks = [stage.frame_input(frames[g][None])[0] for g in range(max(frames) + 1)]
            tokens = torch.stack([torch.cat([t, *blocks]) for t in texts])
            logits = stage.full(tokens, temporal, bias)[:, T + f * n + p]
            if uncond is not None:
                logits = logits[1] + guidance * (logits[0] - logits[1])
            frames[f][p] = logits.reshape(-1).argmax()
    return frames


def release_recipe_video(stage1, stage2, prompt):
    """The release's recipe by hand (cogvideo_pipeline.py): frame 0 unguided with text attention bias
    1.4 and " 高清摄影"; stage 1 guided 3.0 by "4.0秒<n>视频" with " 视频", bias 0; stage 2 (2.0 s
    windows of keyframes 0-2 and 2-4) unguided on the bare prompt, bias 1.4."""
    frame0 = greedy_reference(stage1, f"{prompt} 高清摄影", {}, (0,), temporal=False, bias=1.4)[0]
    keys = greedy_reference(
        stage1, f"4.0秒<n>{prompt} 视频", {0: frame0}, (1, 2, 3, 4), uncond="4.0秒<n>视频", guidance=3.0
    )
    video = []
    for w in (0, 1):
        given = {0: keys[2 * w], 2: keys[2 * w + 1], 4: keys[2 * w + 2]}
        window = greedy_reference(stage2, f"2.0秒<n>{prompt}", given, (1, 3), bias=1.4)
        video += [given[0], window[1], given[2], window[3]]
    return torch.stack(video + [keys[4]])


@pytest.fixture(scope="module")
def recipe():
    stage1, stage2 = real_stage("tiny", 0), real_stage("tiny-stage2", 1)
    return stage1, stage2, release_recipe_video(stage1, stage2, "a cat")


def real_sampler(stage1, stage2, options=None):
    strategies = {"frame0": GREEDY, "stage1": GREEDY, "stage2": GREEDY}
    options = options or SampleOptions(interpolation_levels=1, duration=4.0)
    return HierarchicalSampler(stage1, stage2, options, char_encoder(stage1.cfg), strategies)


def test_each_stage_samples_with_its_own_release_options(recipe):
    """The sampler (KV cache, whole levels batched) with its default options gives the video the
    release's recipe gives, written out stage by stage above."""
    stage1, stage2, expected = recipe
    video = real_sampler(stage1, stage2).sample(["a cat"])[0]
    assert video.shape == expected.shape == (9, stage1.n)
    assert torch.equal(video, expected)


@pytest.mark.parametrize("bug", ["text bias of the other stage", "stage 2 guided as stage 1"])
def test_planted_per_stage_option_bugs_change_the_video(recipe, bug, monkeypatch):
    """Stage 2's level on the recipe's keyframes, with the stage's options read wrongly."""
    stage1, stage2, expected = recipe
    sampler = real_sampler(stage1, stage2)
    keyframes = expected[0::2][None]
    assert torch.equal(sampler.interpolate(["a cat"], keyframes, 0)[0], expected)  # unplanted: the same
    if bug == "text bias of the other stage":
        text_bias = SampleOptions.text_bias
        other = {"stage1": "stage2", "stage2": "stage1"}
        monkeypatch.setattr(SampleOptions, "text_bias", lambda self, stage: text_bias(self, other[stage]))
    else:
        sampler.options.stage2_guidance = sampler.options.stage1_guidance
    assert not torch.equal(sampler.interpolate(["a cat"], keyframes, 0)[0], expected)
