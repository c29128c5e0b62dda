"""bench.flamby: FLamby's model, FLamby's standardisation, and one run of its protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import flamby


def test_the_two_logit_unit_is_flambys_sigmoid_with_binary_cross_entropy():
    torch.manual_seed(0)
    model = flamby.flamby_logreg((13,), 2)
    x, y = torch.randn(32, 13), torch.randint(0, 2, (32,))
    logits = model(x)
    z = model.linear(x).squeeze(1)
    cross_entropy = torch.nn.functional.cross_entropy(logits, y)
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(z), y.float())
    torch.testing.assert_close(cross_entropy, bce)
    assert torch.equal(logits.argmax(1), (torch.sigmoid(z) > 0.5).long())
    with pytest.raises(ValueError):
        flamby.flamby_logreg((13,), 3)


def test_each_hospital_is_standardised_with_its_own_training_rows():
    data = flamby.flamby_data()
    assert [len(s) for s in data.train] == [199, 172, 30, 85]
    assert [len(s) for s in data.test] == [104, 89, 16, 45]
    for shard in data.train:
        kept = shard.x.std(axis=0, ddof=1) > 0  # switzerland has a constant column
        np.testing.assert_allclose(shard.x.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(shard.x.std(axis=0, ddof=1)[kept], 1.0, rtol=1e-4)
    np.testing.assert_allclose(data.pooled_train.x.mean(axis=0), 0.0, atol=1e-5)
    assert len(data.pooled_test) == 254


def test_one_fedavg_run_of_flambys_protocol_lands_in_flambys_range(tmp_path):
    """15 rounds of 100 steps of batch 4 at 0.001: FLamby reports 0.685 ± 0.025 for the
    hospitals' mean and 0.748 ± 0.024 pooled; a run far outside means the protocol or
    its scoring broke."""
    hospitals, pooled = flamby.federated("FedAvg", 0, flamby.flamby_data(), tmp_path)
    assert 0.60 <= hospitals <= 0.77 and 0.67 <= pooled <= 0.83
