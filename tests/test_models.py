"""Model zoo and user model references."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from fedml.errors import FedmlError
from fedml.models import build_model


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
def test_builtin_models_map_inputs_to_logits(name):
    model = build_model(name, (1, 8, 8), 10, seed=0)
    assert model(torch.zeros(4, 1, 8, 8)).shape == (4, 10)


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
