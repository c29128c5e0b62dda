"""Model zoo (logreg, mlp, cnn) and user models given as `module:factory`.

A factory is called as `factory(input_shape=(...), num_classes=N)` and returns a
`torch.nn.Module` mapping a batch shaped `(B, *input_shape)` to `(B, num_classes)` logits.
Initial weights are drawn under the run seed, so every run starts from the same model.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from fedml.config import RunConfig
from fedml.errors import FedmlError


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


def cnn(input_shape: tuple[int, ...], num_classes: int, hidden: int = 64) -> nn.Module:
    """Two conv blocks and a linear head, for image data shaped (C, H, W) or (H, W)."""
    reshape: nn.Module = nn.Identity()
    if len(input_shape) == 2:
        input_shape = (1, *input_shape)
        reshape = nn.Unflatten(1, (1, input_shape[1]))
    if len(input_shape) != 3:
        raise FedmlError(
            f"model 'cnn' needs image data shaped (C, H, W) or (H, W); this dataset's "
            f"examples are shaped {input_shape}. Use 'mlp' or 'logreg'."
        )
    channels = input_shape[0]
    return nn.Sequential(
        reshape,
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


BUILTIN: dict[str, Callable[..., nn.Module]] = {"logreg": logreg, "mlp": mlp, "cnn": cnn}


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
            f"model.name '{reference}' is neither a built-in model (logreg, mlp, cnn) nor a "
            "'module:factory' reference."
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
