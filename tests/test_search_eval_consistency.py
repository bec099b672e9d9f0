"""A performance-priority supernet evaluates what it trained: after a short search, its eval-mode
accuracy on the training clips is close to its training accuracy, for every sampling mode — and,
for per-channel sampling, evaluating with the rule of the other layout (which the slots now
refuse) is not."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cakes.ops import PerformancePriority
from cakes.ops.search import PerformancePrioritySlot, search_slots


def motion_clips(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(n, 1, 4, 12, 12)`` clips of a random pattern sliding right (label 0) or left (label 1) by
    one pixel per frame: every frame set is shared by both classes, only time order tells them apart."""
    pattern = torch.rand(n, 1, 12, 20, generator=generator)
    labels = torch.randint(2, (n,), generator=generator)
    frames = []
    for t in range(4):
        shift = torch.where(labels == 0, 4 + t, 4 - t)
        frames.append(torch.stack([p[:, :, s : s + 12] for p, s in zip(pattern, shift.tolist(), strict=True)]))
    return torch.stack(frames, dim=2), labels


class TinySupernet(nn.Module):
    """``(N, 1, 4, 12, 12) -> (N, 2)``: a pointwise stem, two supernet slots, average pool, linear."""

    def __init__(self, operator: PerformancePriority, width: int = 12) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, width, 1), nn.BatchNorm3d(width), nn.ReLU())
        self.slot1 = operator(layer="slot1", in_channels=width, out_channels=width, norm=nn.BatchNorm3d)
        self.slot2 = operator(layer="slot2", in_channels=width, out_channels=width, norm=nn.BatchNorm3d)
        self.fc = nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.slot1(self.stem(x)))
        x = F.relu(self.slot2(x))
        return self.fc(x.mean(dim=(2, 3, 4)))


def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def short_search(op_set: str, sampling: str) -> tuple[nn.Module, Tensor, Tensor, float]:
    """Train a tiny supernet for a few hundred steps; returns it, the training clips and the training
    accuracy (train mode: sampled paths, batch statistics) over the last steps."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = motion_clips(256, gen)
    net = TinySupernet(PerformancePriority(op_set, sampling=sampling, seed=0))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    correct = []
    for step in range(240):
        idx = torch.randint(len(x), (32,), generator=gen)
        logits = net(x[idx])
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 180:
            correct.append((logits.argmax(1) == y[idx]).float().mean().item())
    net.train()
    return net, x, y, sum(correct) / len(correct)


@pytest.mark.slow
@pytest.mark.parametrize(
    "op_set, sampling", [("c123d", "per_channel"), ("c123d", "pair_subset"), ("c23d", "split_uniform")]
)
def test_eval_mode_supernet_scores_like_training(op_set, sampling):
    net, x, y, train_acc = short_search(op_set, sampling)
    assert train_acc > 0.8, f"the {sampling} supernet did not learn (train acc {train_acc:.2f}; chance 0.5)"
    net.eval()
    eval_acc = accuracy(net, x, y)
    assert abs(eval_acc - train_acc) < 0.1, (sampling, train_acc, eval_acc)

    if sampling != "per_channel":
        return  # op-major sampling moves channels between positions every step: the next conv learns to
        # tolerate that, so no eval order can mislead it (and there is no negative control to run)
    # the negative control: evaluating with the other layout's rule permutes what the next layer reads
    other = {"channel_argmax": "layer_topk", "layer_topk": "channel_argmax"}
    for slot in search_slots(net):
        assert isinstance(slot, PerformancePrioritySlot)
        object.__setattr__(slot, "selection", other[slot.selection])
    assert accuracy(net, x, y) < eval_acc - 0.1
