"""The trainer's average of the weights (pretrain/ema.py) against diffusers' EMAModel (an
independent implementation of the same schedule) over a few optimizer steps; a run interrupted,
saved and resumed through state_dict equals an uninterrupted one bit for bit; a skipped update,
an ignored warm-up or an update count not restored fails them; the config refuses what it cannot
average (ZeRO-3)."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel
from torch import nn

from cogvideo.checkpoint.io import CheckpointError
from cogvideo.checkpoint.training import EMA_PREFIX
from cogvideo.configio import ConfigError
from pretrain.config import TrainConfig, _check_numbers
from pretrain.ema import EMA

STEPS = 6
DECAY = 0.9  # reached at step 81 of the warm-up (1 + m) / (10 + m): every step here warms up


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)  # frozen: not averaged
    return model


def train(model, ema, steps, first_step=0, optimizer=None):
    """SGD steps on seeded batches (batch i is the same whoever runs it), the average updated after each."""
    optimizer = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(first_step, first_step + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
        loss = (model(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
    return optimizer


def test_the_average_is_diffusers_emamodels():
    model = tiny_model()
    ema = EMA({"": model}, DECAY)
    trained = [p for p in model.parameters() if p.requires_grad]
    reference = EMAModel(trained, decay=DECAY, foreach=False)
    optimizer = torch.optim.SGD(trained, lr=0.5)
    for step in range(STEPS):
        train(model, ema, 1, step, optimizer)
        reference.step(trained)
        assert ema.current_decay() == reference.get_decay(reference.optimization_step + 1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(ema.shadow) == set(names)  # the frozen bias is not averaged
    for name, expected in zip(names, reference.shadow_params):
        assert torch.equal(ema.shadow[name], expected), name
    assert not torch.equal(ema.shadow["2.weight"], model[2].weight)  # an average, not the weights


def _after(steps: int, planted=None) -> EMA:
    model = tiny_model()
    ema = EMA({"": model}, DECAY)
    if planted:
        planted(ema)
    train(model, ema, steps)
    return ema


@pytest.mark.parametrize("planted", ["skipped update", "no warm-up"])
def test_a_skipped_update_or_an_ignored_warm_up_is_caught(planted):
    expected = _after(STEPS).shadow

    def plant(ema):
        if planted == "skipped update":
            update = ema.update

            def skip_third():
                if ema.updates == 2 and not getattr(ema, "skipped", False):
                    ema.skipped = True
                    return
                update()

            ema.update = skip_third
        else:
            ema.current_decay = lambda: DECAY

    got = _after(STEPS, plant).shadow
    assert any(not torch.allclose(got[n], expected[n]) for n in expected)


def _resumed(tmp_path, forget_count: bool = False) -> dict:
    """STEPS // 2 steps, model, optimizer and average saved (loaded back weights_only), then the
    rest in fresh objects."""
    model = tiny_model()
    ema = EMA({"": model}, DECAY)
    optimizer = train(model, ema, STEPS // 2)
    path = tmp_path / "state.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, path)
    state = torch.load(path, weights_only=True)
    model = tiny_model(seed=1)  # other weights until loaded
    model.load_state_dict(state["model"])
    ema = EMA({"": model}, DECAY)
    if forget_count:
        state["ema"]["updates"] = 0
    ema.load_state_dict(state["ema"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    train(model, ema, STEPS - STEPS // 2, STEPS // 2, optimizer)
    return ema.shadow


def test_an_interrupted_and_resumed_average_equals_an_uninterrupted_one(tmp_path):
    expected = _after(STEPS).shadow
    resumed = _resumed(tmp_path)
    assert all(torch.equal(resumed[n], expected[n]) for n in expected)
    forgot = _resumed(tmp_path, forget_count=True)  # planted: the warm-up restarts on resume
    assert any(not torch.equal(forgot[n], expected[n]) for n in expected)


def test_a_state_of_another_model_is_refused_naming_the_difference():
    state = EMA({"": tiny_model()}, DECAY).state_dict()
    del state[EMA_PREFIX + "2.bias"]
    with pytest.raises(CheckpointError, match="2.bias"):
        EMA({"": tiny_model()}, DECAY).load_state_dict(state)


def test_the_config_takes_a_decay_in_0_1_and_refuses_zero_3():
    cfg = TrainConfig()
    cfg.optim.ema_decay = 0.999
    _check_numbers(cfg)
    cfg.optim.ema_decay = 1.0
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        _check_numbers(cfg)
    cfg.optim.ema_decay, cfg.parallel.zero_stage = 0.999, 3
    with pytest.raises(ConfigError, match="optim.ema_decay.*zero_stage=3"):
        _check_numbers(cfg)
