import pytest
import torch

from cogvideo.diffusion.guidance import drop_condition, guide, guided_prediction


def test_guide_is_the_published_formula_on_hand_computed_values():
    cond, uncond = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    # uncond + 2.5 * (cond - uncond) = [1 + 5, 1 - 5]
    assert torch.equal(guide(cond, uncond, 2.5), torch.tensor([6.0, -4.0]))
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    assert torch.equal(guide(cond, uncond, 0.0), uncond)


def test_guided_prediction_runs_both_halves_in_one_batch_and_skips_uncond_at_scale_one():
    calls = []

    def predict(x, c):  # a prediction that depends on the condition row by row
        calls.append(x.shape[0])
        return x * c[:, None]

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    cond, uncond = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.5])
    out = guided_prediction(predict, x, cond, uncond, 4.0)
    expected = x * uncond[:, None] + 4.0 * (x * cond[:, None] - x * uncond[:, None])
    assert torch.allclose(out, expected, rtol=0, atol=1e-6) and calls == [4]
    # planted: halves swapped (cond and uncond exchanged) gives a different answer
    swapped = guide(x * uncond[:, None], x * cond[:, None], 4.0)
    assert not torch.allclose(out, swapped)
    assert torch.equal(guided_prediction(predict, x, cond, uncond, 1.0), x * cond[:, None])
    assert calls == [4, 2]


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_drop_condition_replaces_whole_rows_at_rate_p(p):
    cond = torch.arange(1, 1 + 4000 * 3, dtype=torch.float32).reshape(4000, 3)
    null = torch.zeros(3)
    out = drop_condition(cond, null, p, torch.Generator().manual_seed(0))
    dropped = (out == 0).all(dim=1)
    kept = (out == cond).all(dim=1)
    assert bool((dropped ^ kept).all())  # each row is either whole or dropped whole
    # binomial(4000, p): 5 standard deviations
    assert abs(dropped.float().mean().item() - p) <= 5 * (p * (1 - p) / 4000) ** 0.5 + 1e-9
    again = drop_condition(cond, null, p, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
