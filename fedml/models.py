"""Model zoo (logreg, mlp, cnn, lenet, resnet18-gn) and user models as `module:factory`.

A factory is called as `factory(input_shape=(...), num_classes=N)` and returns a
`torch.nn.Module` mapping a batch shaped `(B, *input_shape)` to `(B, num_classes)` logits.
Initial weights are drawn under the run seed, so every run starts from the same model.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedml.arrays import to_state_dict
from fedml.config import RunConfig
from fedml.data.features import Standardization
from fedml.errors import FedmlError
from fedml.runstore import read_model, read_model_description


def logreg(input_shape: tuple[int, ...], num_classes: int, hidden: int = 0) -> nn.Module:
    """Multinomial logistic regression on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 64) -> nn.Module:
    """One hidden ReLU layer on the flattened input."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _image_input(name: str, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], nn.Module]:
    """The (C, H, W) shape a convolutional model sees, and the layer that gives a batch
    that shape: (H, W) examples get one channel."""
    if len(input_shape) == 2:
        return (1, *input_shape), nn.Unflatten(1, (1, input_shape[0]))
    if len(input_shape) != 3:
        raise FedmlError(
            f"model '{name}' needs image data shaped (C, H, W) or (H, W); this dataset's "
            f"examples are shaped {input_shape}. Use 'mlp' or 'logreg'."
        )
    return input_shape, nn.Identity()


def _features(body: nn.Module, input_shape: tuple[int, ...]) -> int:
    """How many features `body` makes of one example (what sizes the head)."""
    with torch.no_grad():
        return body(torch.zeros(1, *input_shape)).numel()


def cnn(input_shape: tuple[int, ...], num_classes: int, hidden: int = 0) -> nn.Module:
    """The CNN of the FedAvg paper (McMahan et al. 2017): two 5x5 convolutions of 32 and
    64 channels, each followed by ReLU and 2x2 max pooling, a fully connected layer of
    512 ReLU units and the output layer; 1,663,370 parameters on 28x28 MNIST. The
    convolutions keep the size (padding 2) and pooling rounds up, so any H x W works,
    down to digits' 8x8. No BatchNorm: DP-SGD (Opacus) trains it as it is. `hidden`
    is not used: the paper's 512 units are part of the model."""
    shape, reshape = _image_input("cnn", input_shape)
    body = nn.Sequential(
        reshape,
        nn.Conv2d(shape[0], 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(),
    )
    head = [nn.Linear(_features(body, input_shape), 512), nn.ReLU(), nn.Linear(512, num_classes)]
    return nn.Sequential(*body, *head)


def lenet(input_shape: tuple[int, ...], num_classes: int, hidden: int = 0) -> nn.Module:
    """The small CNN of Flower's PyTorch quickstart, LeNet-5 style, for colour images such
    as CIFAR-10's 3x32x32: two 5x5 convolutions of 6 and 16 channels, each followed by
    ReLU and 2x2 max pooling, then 120 and 84 ReLU units; 62,006 parameters on CIFAR-10.
    Images smaller than 32x32 are zero-padded to it (its unpadded convolutions need
    the room). `hidden` is not used."""
    shape, reshape = _image_input("lenet", input_shape)
    pad_h, pad_w = max(0, 32 - shape[1]), max(0, 32 - shape[2])
    body = nn.Sequential(
        reshape,
        nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)),
        nn.Conv2d(shape[0], 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    head = [
        nn.Linear(_features(body, input_shape), 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    ]
    return nn.Sequential(*body, *head)


RESNET_GROUPS = 2  # GroupNorm groups per layer, as in Hsieh et al. 2020


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions and a shortcut, GroupNorm after each."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(RESNET_GROUPS, outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(RESNET_GROUPS, outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                nn.GroupNorm(RESNET_GROUPS, outputs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def resnet18_gn(input_shape: tuple[int, ...], num_classes: int, hidden: int = 0) -> nn.Module:
    """ResNet-18 (He et al. 2016) in its CIFAR form (a 3x3 stem, no max pooling), with
    GroupNorm of 2 groups in place of BatchNorm, the usual non-IID CIFAR baseline (Hsieh
    et al. 2020): batch statistics mislead when each site's data differs, and DP-SGD
    cannot train BatchNorm. 11,173,962 parameters on CIFAR-10. `hidden` is not used."""
    shape, reshape = _image_input("resnet18-gn", input_shape)
    layers: list[nn.Module] = [
        reshape,
        nn.Conv2d(shape[0], 64, 3, 1, 1, bias=False),
        nn.GroupNorm(RESNET_GROUPS, 64),
        nn.ReLU(),
    ]
    inputs = 64
    for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(inputs, outputs, stride), _BasicBlock(outputs, outputs, 1)]
        inputs = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "logreg": logreg,
    "mlp": mlp,
    "cnn": cnn,
    "lenet": lenet,
    "resnet18-gn": resnet18_gn,
}


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int, hidden: int = 64
) -> nn.Module:
    """Construct the model `name` with weights initialised from `seed`."""
    # Seed only the CPU generator that module initialisation draws from, and restore it
    # afterwards (torch.manual_seed would also seed every accelerator backend: slow).
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        if name in BUILTIN:
            return BUILTIN[name](input_shape, num_classes, hidden=hidden)
        return _user_model(name, input_shape, num_classes)
    finally:
        generator.set_state(saved)


def model_for(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The run's model (`cfg.model`), initialised from the run seed. With example-level
    DP it is checked (or, with `dp.fix_model`, repaired) for Opacus here, so server and
    clients build the same architecture and a bad model fails before any training."""
    model = build_model(cfg.model.name, input_shape, num_classes, cfg.seed, hidden=cfg.model.hidden)
    if cfg.dp.mode == "sample":
        model = private_model(model, cfg.dp.fix_model)
    return model


def private_model(model: nn.Module, fix: bool) -> nn.Module:
    """`model` if Opacus can train it privately; with `fix`, Opacus's repaired copy
    (e.g. BatchNorm -> GroupNorm); else a `FedmlError` naming the offending layers."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model
    if fix:
        fixed = ModuleValidator.fix(model)
        remaining = ModuleValidator.validate(fixed, strict=False)
        if not remaining:
            return fixed
        errors = remaining
    problems = "; ".join(sorted({str(error) for error in errors}))
    hint = (
        "Opacus cannot repair these layers: change the model."
        if fix
        else "Set dp.fix_model = true to let Opacus replace them, or change the model."
    )
    raise FedmlError(f"The model cannot be trained with DP-SGD: {problems}. {hint}")


def _user_model(reference: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise FedmlError(
            f"model.name '{reference}' is neither a built-in model ({', '.join(BUILTIN)}) "
            "nor a 'module:factory' reference."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FedmlError(
            f"model '{reference}': module '{module_name}' cannot be imported ({exc}). "
            "Install it or put it on PYTHONPATH."
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise FedmlError(f"model '{reference}': '{module_name}' has no callable '{attr}'.")
    try:
        inspect.signature(factory).bind(input_shape=input_shape, num_classes=num_classes)
    except TypeError as exc:
        raise FedmlError(
            f"model '{reference}': the factory must accept input_shape=... and "
            f"num_classes=... keyword arguments ({exc})."
        ) from exc
    model = factory(input_shape=input_shape, num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise FedmlError(
            f"model '{reference}' returned {type(model).__name__}, not a torch.nn.Module."
        )
    return model


STANDARDIZATION_HOOK = "_fedml_standardization"  # the attribute that marks a standardising model


def with_standardization(model: nn.Module, standardization: Standardization) -> nn.Module:
    """`model`, made to take raw rows: before its forward pass a missing value (NaN)
    becomes its feature's mean and every feature is standardised, (x - mean) / scale,
    with the run's federated statistics (`fedml.data.features`). The statistics are
    buffers that are not part of the state dict, so the trained arrays (and everything
    that aggregates, screens, masks or noises them) are the model's own weights alone.
    Calling it again replaces the statistics."""
    mean = torch.as_tensor(standardization.mean, dtype=torch.float32)
    scale = torch.as_tensor(standardization.scale, dtype=torch.float32)
    model.register_buffer("feature_mean", mean, persistent=False)
    model.register_buffer("feature_scale", scale, persistent=False)
    if getattr(model, STANDARDIZATION_HOOK, None) is None:
        handle = model.register_forward_pre_hook(_standardize_input)
        setattr(model, STANDARDIZATION_HOOK, handle)
    return model


def _standardize_input(model: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    mean, scale = model.feature_mean, model.feature_scale
    flat = x.flatten(1)  # (0, ...) too: DP-SGD's Poisson batches may be empty
    if flat.shape[1] != len(mean):
        raise FedmlError(
            f"The run standardises {len(mean)} features but these examples have "
            f"{flat.shape[1]}: every site's data needs the server's features, in its order."
        )
    flat = torch.where(torch.isnan(flat), mean, flat)
    return ((flat - mean) / scale).reshape(x.shape), *rest


def describe_model(
    cfg: RunConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    standardization: Standardization | None,
) -> dict[str, Any]:
    """What rebuilds the run's module from its model file alone (`load_model`): the
    architecture, its input and output sizes, whether Opacus repaired it, and the run's
    standardisation (so the loaded model takes raw rows, as it did in the run)."""
    return {
        "name": cfg.model.name,
        "hidden": cfg.model.hidden,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "private": cfg.dp.mode == "sample",
        "fix_model": cfg.dp.fix_model,
        "standardization": None
        if standardization is None
        else {
            "mean": [float(v) for v in standardization.mean],
            "scale": [float(v) for v in standardization.scale],
        },
    }


def load_model(path: Path, trust_code: bool = False) -> nn.Module:
    """A run's model file (`RUN_DIR/model.safetensors`, or a commit's
    `arrays.safetensors`) as a ready module in eval mode: the run's architecture holding
    the trained weights and, when the run standardised its features, applying the same
    standardisation (missing values become the federation's means), so it takes raw rows
    exactly as the sites' rows were taken. A `module:factory` model named by the file
    is imported only with `trust_code` (the file is data; importing runs code)."""
    description = read_model_description(path)
    if description is None:
        raise FedmlError(
            f"{path} does not say which model it holds (written by an older fedml): build "
            "the run's model with fedml.models.model_for and load_state_dict its arrays."
        )
    if description["name"] not in BUILTIN and not trust_code:
        raise FedmlError(
            f"{path} holds the user model {description['name']!r}: loading it imports and "
            "runs that module. Pass trust_code=True if you trust the file and the module."
        )
    model = build_model(
        description["name"],
        tuple(description["input_shape"]),
        int(description["num_classes"]),
        seed=0,
        hidden=int(description["hidden"]),
    )
    if description["private"]:
        model = private_model(model, bool(description["fix_model"]))
    model.load_state_dict(to_state_dict(read_model(path)), strict=True)
    scaling = description.get("standardization")
    if scaling:
        with_standardization(
            model, Standardization(np.asarray(scaling["mean"]), np.asarray(scaling["scale"]))
        )
    return model.eval()
