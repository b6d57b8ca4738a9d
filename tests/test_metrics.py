"""MACs and parameter counts: what the targets and the report count."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compressor import metrics


class TinyAttention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_multihead_attention_is_counted_in_eval_mode_too():
    """The inference fast path is one fused op the flop counter does not see; counting
    turns it off, so the projections and the attention products count, and puts it back."""
    d, tokens = 16, 5
    model = TinyAttention(d).eval()
    x = torch.randn(1, tokens, d)
    by_hand = tokens * 4 * d * d + 2 * tokens * tokens * d + d * 3  # qkv+out, QK^T and AV, head
    assert metrics.count_macs(model, x) == pytest.approx(by_hand, rel=0.02)
    assert torch.backends.mha.get_fastpath_enabled()
    assert not model.training


def test_conv_macs_per_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).train()
    per_module, total = metrics.count_macs_per_module(model, torch.randn(1, 3, 10, 10))
    assert per_module == {"0": 3 * 8 * 9 * 100, "2": 8 * 4 * 100}
    assert total == sum(per_module.values())
    assert model.training  # counting leaves the mode as it was


def test_paired_standard_error_of_a_drop_is_that_of_the_per_sample_differences():
    reference = torch.tensor([100.0] * 90 + [0.0] * 10)  # the input model: 90% top-1
    scores = reference.clone()
    scores[:6] = 0.0  # it now misses 6 images it had right and gets 2 it missed
    scores[90:92] = 100.0
    mean, stderr = metrics.paired_mean_and_stderr(scores, reference)
    d = (reference - scores).numpy()
    assert mean == pytest.approx(86.0)
    assert stderr == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)))
    assert stderr == pytest.approx(100 * math.sqrt(0.08 / 100), rel=0.02)  # 8 disagreements
    assert metrics.paired_mean_and_stderr(reference, reference) == (90.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        metrics.paired_mean_and_stderr(scores[:5], reference)


def test_mean_over_ranks_is_the_mean_of_the_scores():
    assert metrics.mean_over_ranks(torch.tensor([100.0, 0.0, 100.0, 100.0])) == 75.0
    assert math.isnan(metrics.mean_over_ranks(torch.zeros(0)))
