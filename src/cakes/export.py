"""Deployment export of a derived (or baseline) network to ONNX, with a parity check in onnxruntime.

Command line — the same overrides as ``train.py`` (the network and its input shape come from the
composed config), or a checkpoint (the network config, input shape and weights come from it)::

    python -m cakes.export experiment=ssv1_cakes arch=ssv1_cakes23d_c format=onnx out=cakes23d_c.onnx
    python -m cakes.export ckpt=logs/.../checkpoints/last.ckpt format=onnx out=model.onnx [batch=2]

Export options (``key=value``, the rest are config overrides): ``format`` (``onnx``), ``out`` (the
file, written atomically), ``ckpt`` (optional), ``batch`` (default 1), ``check`` (default true:
run the file in onnxruntime on a random input and report the largest absolute difference from
PyTorch; fails above ``1e-4``). The network is exported in ``eval()`` mode, float32, with a fixed
input shape ``(batch, *model.input_shape)``; a ``CakesConv3d`` exports as its per-group
convolutions and a concat. Needs the ``deploy`` extra (``pip install -e ".[deploy]"``:
``onnx``, ``onnxscript``, ``onnxruntime``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

FORMATS = ("onnx",)
OPTIONS = ("format", "out", "ckpt", "batch", "check")
#: parity bound of the check (max absolute difference, float32)
TOLERANCE = 1e-4


def export_onnx(net: nn.Module, input_shape: Sequence[int], path: str | os.PathLike) -> Path:
    """Export ``net`` (put in eval mode) for inputs of ``input_shape`` (batch axis included) to
    ``path`` (atomically: a temporary file in the same folder, then renamed). Returns the path."""
    from cakes.files import atomic_output

    path = Path(path)
    net = net.eval()
    example = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        program = torch.onnx.export(net, (example,), dynamo=True, external_data=False, verbose=False)
    with atomic_output(path, suffix=".onnx") as tmp:
        program.save(str(tmp))
    return path


def onnx_max_abs_diff(net: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Largest absolute difference between ``net(x)`` (eval, no grad) and onnxruntime's CPU run of
    the exported file on ``x`` (its shape must be the exported one)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().float().contiguous().numpy()})
    with torch.no_grad():
        want = net.eval()(x)
    return float((torch.from_numpy(got) - want).abs().max())


def network_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, list[int]]:
    """The network of a cakes checkpoint (its stored config, weights loaded strictly; read with
    ``weights_only=True``: no code runs) and its input shape without the batch axis."""
    from cakes.builders import build_network
    from cakes.checkpoints import load_strict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    if not isinstance(hparams, Mapping) or "net" not in hparams or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a cakes checkpoint (expected 'hyper_parameters.net' and 'state_dict')")
    if not hparams.get("input_shape"):
        raise ValueError(f"{path}: hyper_parameters.input_shape is missing; cannot tell the export's input shape")
    net = build_network(hparams["net"], pretrained=False)
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    load_strict(net, state, str(path))
    return net, [int(s) for s in hparams["input_shape"]]


def split_arguments(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` export options (:data:`OPTIONS`) apart from the config overrides."""
    options, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in OPTIONS:
            options[key] = value
        else:
            overrides.append(arg)
    return options, overrides


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m cakes.export``: see the module docstring. Returns the written path."""
    options, overrides = split_arguments(list(sys.argv[1:] if argv is None else argv))
    fmt = options.get("format", "onnx")
    if fmt not in FORMATS:
        raise SystemExit(f"cakes.export: format={fmt!r} is not supported; expected one of {list(FORMATS)}")
    if not options.get("out"):
        raise SystemExit("cakes.export: give the output file, e.g. out=model.onnx")
    try:
        batch = int(options.get("batch", "1"))
    except ValueError:
        batch = 0
    if batch < 1:
        raise SystemExit(f"cakes.export: batch must be a positive integer, got {options['batch']!r}")
    check = options.get("check", "true").lower()
    if check not in ("true", "false"):
        raise SystemExit(f"cakes.export: check must be true or false, got {options['check']!r}")
    if options.get("ckpt"):
        if overrides:
            raise SystemExit(f"cakes.export: with ckpt= the network comes from the checkpoint; drop {overrides}")
        net, shape = network_from_checkpoint(options["ckpt"])
    else:
        from cakes.config import compose_train_config
        from cakes.builders import build_network

        cfg = compose_train_config(overrides)
        net, shape = build_network(cfg.model.net, pretrained=False), [int(s) for s in cfg.model.input_shape]
    input_shape = (batch, *shape)
    path = export_onnx(net, input_shape, options["out"])
    print(f"exported {type(net).__name__} for input {input_shape} to {path}")
    if check == "true":
        x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(1))
        diff = onnx_max_abs_diff(net, path, x)
        print(f"onnxruntime parity on a random input: max |difference| = {diff:.2e} (bound {TOLERANCE:g})")
        if not diff <= TOLERANCE:
            raise SystemExit(f"cakes.export: onnxruntime output differs from PyTorch by {diff:.2e} > {TOLERANCE:g}")
    return path


if __name__ == "__main__":
    main()
