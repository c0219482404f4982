"""The training loss path in bf16, held to fp32 rounding: the model's bf16 logits go through the
family's loss (cross entropy over the image ids, masked mean), which must equal the float64 cross
entropy of those very logits.

Bound: the loss path computes in fp32 whatever the logits' dtype. A per-token cross entropy over
K classes is a sum of K exponentials, a log and a difference, within (K + 2) eps of exact
(relative to the larger of its terms, the log-sum-exp); the masked mean of N of them adds N eps.
So per token |ce - ce64| <= (K + 2) eps lse, and for the mean (K + N + 4) eps mean(lse). A loss
computed in bf16 instead (u = 2^-8 = 32768 eps) misses both by orders of magnitude; planted below.
"""

import pytest
import torch
import torch.nn.functional as F
from model_helpers import random_batch, random_model
from tolerances import FP32_EPS

import cogvideo.models.cogvideo
import cogvideo.models.cogvideo.model
from cogvideo.family import family_of
from cogvideo.tp_plan import vocab_cross_entropy


class Batch:
    def __init__(self, tokens, targets, loss_mask):
        self.tensors = {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


@pytest.fixture(scope="module")
def bf16_run():
    """The tiny model in bf16, its logits on a batch with padded and full prompts, the batch."""
    model = random_model("tiny").to(torch.bfloat16)
    tokens, targets, mask = random_batch(model.cfg, text_lengths=(3, None, 5, None))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    return model, logits, Batch(tokens, targets, mask)


def float64_cross_entropy(logits, targets, classes):
    """Per token: log-sum-exp over the image ids minus the target's logit, and the log-sum-exp."""
    z = logits[..., :classes].double()
    lse = torch.logsumexp(z, dim=-1)
    return lse - z.gather(-1, targets[..., None]).squeeze(-1), lse


def check_loss_path(model, logits, batch) -> None:
    cfg = model.cfg
    K = cfg.vocab.num_image_tokens
    targets, mask = batch.tensors["targets"], batch.tensors["loss_mask"]
    ce64, lse = float64_cross_entropy(logits, targets, K)
    per_token = cogvideo.models.cogvideo.model.vocab_cross_entropy(logits, targets, K)
    assert per_token.dtype == torch.float32
    assert ((per_token.double() - ce64).abs() <= (K + 2) * FP32_EPS * lse.abs()).all()
    with torch.no_grad():
        loss = family_of(cfg).loss(cfg, model, batch, torch.device("cpu"))
    n = int(mask.sum())
    expected = ce64[mask].mean()
    assert abs(loss.double() - expected) <= (K + n + 4) * FP32_EPS * lse[mask].abs().mean()


def test_bf16_logits_give_the_float64_cross_entropy_of_those_logits(bf16_run):
    check_loss_path(*bf16_run)


def cross_entropy_in_logits_dtype(logits, targets, num_classes):
    flat = F.cross_entropy(logits[..., :num_classes].flatten(0, -2), targets.flatten(), reduction="none")
    return flat.view_as(targets).float()


def mean_in_logits_dtype(cfg, logits, targets, loss_mask):
    per_token = vocab_cross_entropy(logits, targets, cfg.vocab.num_image_tokens).to(logits.dtype)
    weights = loss_mask.to(per_token.dtype)
    return ((per_token * weights).sum() / weights.sum()).float()


@pytest.mark.parametrize(
    "module, name, bug",
    [
        (cogvideo.models.cogvideo.model, "vocab_cross_entropy", cross_entropy_in_logits_dtype),
        (cogvideo.models.cogvideo, "image_token_loss", mean_in_logits_dtype),
    ],
    ids=["cross entropy in bf16", "masked mean in bf16"],
)
def test_planted_bf16_loss_paths_fail_the_check(bf16_run, module, name, bug, monkeypatch):
    monkeypatch.setattr(module, name, bug)
    with pytest.raises(AssertionError):
        check_loss_path(*bf16_run)
