"""Local trainer: FedProx's proximal term, determinism, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.trainer import (
    evaluate,
    minibatches,
    proximal_term,
    resolve_device,
    train_local,
)
from fedml.data import Shard
from fedml.errors import FedmlError
from fedml.models import build_model
from fedml.settings import TrainSettings

CPU = torch.device("cpu")


def _blobs(n=200, seed=0) -> Shard:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 4)) + np.eye(3, 4)[y] * 4
    return Shard(x.astype(np.float32), y.astype(np.int64))


def _distance(model, params):
    return sum(((p - g) ** 2).sum().item() for p, g in zip(model.parameters(), params, strict=True))


def test_proximal_gradient_is_mu_times_the_drift():
    torch.manual_seed(0)
    model = build_model("mlp", (4,), 3, seed=0, hidden=5)
    global_params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    mu = 0.7
    ((mu / 2) * proximal_term(model, global_params)).backward()
    for p, g in zip(model.parameters(), global_params, strict=True):
        torch.testing.assert_close(p.grad, mu * (p.detach() - g))


def test_proximal_term_is_the_squared_norm():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    assert proximal_term(model, [torch.zeros(1, 2)]).item() == pytest.approx(25.0)


def test_training_learns_and_is_deterministic():
    shard = _blobs()
    settings = TrainSettings(local_epochs=5, batch_size=16, lr=0.1, momentum=0.0)
    results = []
    for _ in range(2):
        model = build_model("logreg", (4,), 3, seed=0)
        loss_before, _ = evaluate(model, shard, CPU)
        result = train_local(model, shard, settings, CPU, torch.Generator().manual_seed(1))
        results.append((model.state_dict(), result))
        loss_after, acc_after = evaluate(model, shard, CPU)
        assert loss_after < loss_before / 2 and acc_after > 0.9
    (a, ra), (b, rb) = results
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ra == rb and ra.num_examples == 200 and ra.steps == 5 * 13


def test_large_mu_keeps_the_model_near_the_global_one():
    shard = _blobs()
    drift = {}
    for mu in (0.0, 10.0):
        model = build_model("logreg", (4,), 3, seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        settings = TrainSettings(
            local_epochs=3, batch_size=16, lr=0.05, momentum=0.0, proximal_mu=mu
        )
        train_local(model, shard, settings, CPU, torch.Generator().manual_seed(0))
        drift[mu] = _distance(model, start)
    assert drift[10.0] < 0.2 * drift[0.0]


def test_adam_and_weight_decay_are_honoured():
    shard = _blobs()
    model = build_model("logreg", (4,), 3, seed=0)
    settings = TrainSettings(local_epochs=2, lr=0.05, optimizer="adam", weight_decay=0.01)
    train_local(model, shard, settings, CPU, torch.Generator().manual_seed(0))
    assert evaluate(model, shard, CPU)[1] > 0.9


def test_device_choice():
    assert resolve_device("cpu") == CPU
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == CPU
        with pytest.raises(FedmlError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_keeps_model_on_the_gpu():
    shard = _blobs()
    model = build_model("mlp", (4,), 3, seed=0)
    device = resolve_device("cuda")
    train_local(
        model,
        shard,
        TrainSettings(local_epochs=2, momentum=0.0),
        device,
        torch.Generator().manual_seed(0),
    )
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert evaluate(model, shard, device)[1] > 0.9


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40), st.integers(1, 16), st.integers(0, 30), st.integers(1, 3), st.integers(0, 9)
)
def test_local_steps_take_exactly_that_many_batches_each_pass_a_permutation(
    rows, batch, steps, epochs, seed
):
    """With local_steps the loop takes exactly that many minibatches, cycling through
    reshuffled passes over the rows; without, local_epochs full passes. Either way
    `TrainSettings.steps_for` (SCAFFOLD's K) is the count taken, and every full pass
    visits every row once."""
    plan = TrainSettings(local_epochs=epochs, local_steps=steps, batch_size=batch)
    generator = torch.Generator().manual_seed(seed)
    batches = [b.tolist() for b in minibatches(rows, plan, generator, CPU)]
    assert len(batches) == plan.steps_for(rows)
    per_pass = -(-rows // batch)
    assert len(batches) == (steps if steps else epochs * per_pass)
    flat = [i for b in batches for i in b]
    for start in range(0, len(batches) - per_pass + 1, per_pass):
        visited = [i for b in batches[start : start + per_pass] for i in b]
        assert sorted(visited) == list(range(rows))
    assert all(0 <= i < rows for i in flat) and all(1 <= len(b) <= batch for b in batches)


def test_a_round_of_local_steps_does_the_same_work_at_every_size():
    plan = TrainSettings(local_epochs=1, local_steps=25, batch_size=4, lr=0.05, momentum=0.0)
    for n in (7, 200):
        model = build_model("logreg", (4,), 3, seed=0)
        result = train_local(model, _blobs(n), plan, CPU, torch.Generator().manual_seed(0))
        assert result.steps == 25
