"""Parameters and multiply-accumulates (MACs) of a model for one view (one clip / one patch).

MACs count convolutions and matrix products only, by closed form from the shapes each call really
sees (``N·C_out·∏out · C_in/groups · ∏kernel`` for a convolution, ``m·n·k`` for a matrix product).
Norms, activations, pooling and interpolation are not counted; profilers that report "FLOPs" for
the CAKES paper also counted BN and ReLU, which is why its figures sit slightly above ours.

The forward pass runs on whatever device the model lives on; build the model under
``torch.device("meta")`` to count a full-size network in milliseconds without memory.

Command line: ``python -m cakes.profile <train.py overrides>`` (see :func:`main`).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class MacCounter(TorchDispatchMode):
    """Counts MACs of aten convolutions and matrix products, attributed to the innermost module."""

    def __init__(self) -> None:
        super().__init__()
        self.by_module: dict[str, int] = defaultdict(int)
        self.stack: list[str] = [""]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func._overloadpacket
        macs = 0
        if packet is aten.convolution:
            x, w, transposed = args[0], args[1], bool(args[6])
            # weight (C_out, C_in/groups, k...): each output element takes C_in/groups · ∏k MACs;
            # transposed weight (C_in, C_out/groups, k...): each input element feeds C_out/groups · ∏k.
            macs = (x if transposed else out).numel() * w.shape[1] * math.prod(w.shape[2:])
        elif packet in (aten.mm, aten.addmm):
            a, b = (args[0], args[1]) if packet is aten.mm else (args[1], args[2])
            macs = a.shape[0] * a.shape[1] * b.shape[1]
        elif packet in (aten.bmm, aten.baddbmm):
            a, b = (args[0], args[1]) if packet is aten.bmm else (args[1], args[2])
            macs = a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        if macs:
            self.by_module[self.stack[-1]] += macs
        return out


@dataclass
class Profile:
    """Counts for one view; ``views`` multiplies MACs for multi-view testing."""

    params: int
    macs: int
    input_shape: tuple[int, ...]
    views: int = 1
    rows: list[tuple[str, int, int]] = field(default_factory=list)  # (module, params, macs)

    @property
    def macs_all_views(self) -> int:
        return self.macs * self.views

    def as_dict(self) -> dict:
        return {
            "params": self.params,
            "macs": self.macs,
            "gmacs": round(self.macs / 1e9, 4),
            "input_shape": list(self.input_shape),
            "views": self.views,
            "macs_all_views": self.macs_all_views,
        }

    def table(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [6])
        lines = [f"{'module':<{width}}  {'params':>14}  {'GMACs':>10}"]
        for name, params, macs in self.rows:
            lines.append(f"{name:<{width}}  {params:>14,}  {macs / 1e9:>10.3f}")
        lines.append(f"{'total':<{width}}  {self.params:>14,}  {self.macs / 1e9:>10.3f}")
        lines.append(
            f"input {tuple(self.input_shape)} per view; {self.views} view(s): {self.macs_all_views / 1e9:.3f} GMACs"
        )
        return "\n".join(lines)


def count_params(module: nn.Module) -> int:
    """Trainable and frozen parameters (BN affine included, buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def profile(module: nn.Module, input_shape: Sequence[int], views: int = 1, depth: int = 1) -> Profile:
    """Params and MACs of ``module`` for one input of ``input_shape`` (batch dimension included,
    normally 1). ``depth`` sets how deep the per-module table goes (1 = top-level children)."""
    counter = MacCounter()
    names = {m: n for n, m in module.named_modules()}

    def push(mod, _inp):
        counter.stack.append(names[mod])

    def pop(mod, _inp, _out):
        counter.stack.pop()

    handles = []
    for mod in module.modules():
        handles.append(mod.register_forward_pre_hook(push))
        handles.append(mod.register_forward_hook(pop))
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    try:
        with counter:
            module(torch.zeros(*input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)

    def prefix(name: str) -> str:
        return ".".join(name.split(".")[:depth]) if name else "(root)"

    macs_rows: dict[str, int] = defaultdict(int)
    for name, macs in counter.by_module.items():
        macs_rows[prefix(name)] += macs
    params_rows: dict[str, int] = defaultdict(int)
    for name, p in module.named_parameters():
        params_rows[prefix(name.rsplit(".", 1)[0] if "." in name else "")] += p.numel()
    order = [prefix(n) for n, _ in module.named_modules()]
    seen: list[str] = []
    for key in order:
        if key not in seen and (key in macs_rows or key in params_rows):
            seen.append(key)
    rows = [(k, params_rows.get(k, 0), macs_rows.get(k, 0)) for k in seen]
    return Profile(
        params=count_params(module),
        macs=sum(counter.by_module.values()),
        input_shape=tuple(int(s) for s in input_shape),
        views=views,
        rows=rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cakes.profile <overrides>``: compose the train config with the same overrides
    as ``train.py`` (from the same ``conf/``: :func:`cakes.utils.conf_dir`), build the model on the
    meta device (no data, no weights) and print a table followed by one JSON line with ``params``,
    ``macs`` and ``input_shape``. A config that cannot be used (a bad arch, a mistyped override) is
    one line on stderr and exit status 2."""
    import argparse
    import sys

    from cakes.config import compose_train_config, input_shape_from_config, one_line, views_from_config
    from cakes.builders import build_network
    from cakes.arch import check_arch

    parser = argparse.ArgumentParser(
        prog="python -m cakes.profile",
        description=(
            "Parameters and MACs of the model train.py would build with the same overrides (built on the meta "
            "device: no data, no weights): a per-module table, then one JSON line."
        ),
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = compose_train_config(args.overrides)
        check_arch(cfg)
        with torch.device("meta"):
            net = build_network(cfg.model.net, pretrained=False)
        result = profile(net, input_shape_from_config(cfg), views=views_from_config(cfg))
    except Exception as err:  # noqa: BLE001 - a command-line tool: one line, no traceback
        print(f"cakes.profile: error: {one_line(err)}", file=sys.stderr)
        return 2
    print(result.table())
    print(json.dumps(result.as_dict()))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
