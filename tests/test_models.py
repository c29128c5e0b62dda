"""Model zoo and user model references."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from fedml.errors import FedmlError
from fedml.models import build_model


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn", "lenet", "resnet18-gn"])
def test_builtin_models_map_inputs_to_logits(name):
    model = build_model(name, (1, 8, 8), 10, seed=0)
    assert model(torch.zeros(4, 1, 8, 8)).shape == (4, 10)


# Each image model on the inputs it is meant for, with its documented parameter count.
INTENDED = [
    ("cnn", (1, 28, 28), 1_663_370),  # MNIST: the FedAvg paper's count
    ("cnn", (1, 8, 8), None),  # scikit-learn's digits
    ("cnn", (28, 28), 1_663_370),  # images without a channel axis
    ("lenet", (3, 32, 32), 62_006),  # CIFAR-10: Flower's quickstart Net
    ("resnet18-gn", (3, 32, 32), 11_173_962),
]


@pytest.mark.parametrize(("name", "shape", "parameters"), INTENDED)
def test_image_models_learn_their_inputs_and_opacus_trains_them(name, shape, parameters):
    """Sized from the input shape, trainable (8 fixed images are fitted: the loss falls
    well below ln 10), and accepted by Opacus as they are: per-example gradients for
    every parameter, no layer to replace."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    model = build_model(name, shape, 10, seed=0)
    if parameters is not None:
        assert sum(p.numel() for p in model.parameters()) == parameters
    assert ModuleValidator.validate(model, strict=False) == []
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(8, *shape, generator=generator)
    y = torch.arange(8) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and losses[0] > 1.5
    private = GradSampleModule(model)
    torch.nn.functional.cross_entropy(private(x[:4]), y[:4]).backward()
    assert all(p.grad_sample.shape[0] == 4 for p in private.parameters())


def test_same_seed_same_weights_different_seed_different_weights():
    a, b, c = (build_model("mlp", (60,), 10, seed=s) for s in (1, 1, 2))
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a[1].weight, c[1].weight)


def test_cnn_refuses_flat_features():
    with pytest.raises(FedmlError, match="needs image data"):
        build_model("cnn", (60,), 10, seed=0)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent("""
        import torch
        def small(input_shape, num_classes):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))
        def no_kwargs(shape):
            return None
        def not_a_module(input_shape, num_classes):
            return "model"
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_models", None)


def test_module_factory_reference(user_module):
    model = build_model("my_models:small", (1, 8, 8), 10, seed=0)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("nowhere_pkg:make", "cannot be imported"),
        ("my_models:missing", "has no callable 'missing'"),
        ("my_models:no_kwargs", "must accept input_shape"),
        ("my_models:not_a_module", "not a torch.nn.Module"),
        ("my_models:", "neither a built-in model"),
    ],
)
def test_bad_model_references(user_module, name, fragment):
    with pytest.raises(FedmlError, match=fragment):
        build_model(name, (1, 8, 8), 10, seed=0)
