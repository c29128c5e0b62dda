"""Privacy accounting, the client's ledger, DP-SGD training and the DP config checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from hypothesis import given
from hypothesis import strategies as st
from opacus.accountants import create_accountant
from torch import nn

from clients import privacy as client_privacy
from clients.app import train as client_train
from clients.privacy import load_ledger, save_ledger
from fedml.arrays import from_state_dict
from fedml.config import DPConfig, RunConfig, experiment_digest, load_config
from fedml.data import Shard
from fedml.errors import FedmlError
from fedml.models import model_for, private_model
from fedml.privacy import (
    DECLINED_CODE,
    EPSILON_KEY,
    PrivacyReport,
    default_delta,
    epsilon_of,
    noise_for_target,
    with_steps,
)
from fedml.privacy_ledger import (
    FORMAT_1_RUN,
    PrivacyLedger,
    SiteLedger,
    plan_round,
)
from fedml.settings import TrainSettings

entries = st.tuples(
    st.sampled_from([0.8, 1.0, 1.3]), st.sampled_from([0.1, 0.25]), st.integers(1, 40)
)


@given(st.lists(entries, max_size=6))
def test_with_steps_groups_history_as_opacus_stepping_does(spends):
    opacus = create_accountant("rdp")
    ours: list = []
    for noise, rate, steps in spends:
        for _ in range(steps):
            opacus.step(noise_multiplier=noise, sample_rate=rate)
        ours = with_steps(ours, noise, rate, steps)
    assert ours == opacus.history


@given(st.lists(entries, max_size=5), st.lists(st.integers(1, 500), max_size=5), st.floats(0, 9))
def test_ledger_round_trips_through_context_record_and_json(history, rounds, noise):
    ledger = PrivacyLedger(list(history), rounds, noise)
    assert PrivacyLedger.from_record(ledger.to_record()) == ledger
    assert PrivacyLedger.from_json_dict(ledger.to_json_dict()) == ledger


@given(
    st.dictionaries(
        st.text("0123456789abcdef", min_size=1, max_size=16),
        st.tuples(st.lists(entries, max_size=4), st.lists(st.integers(1, 500), max_size=4)),
        max_size=4,
    )
)
def test_a_site_ledger_round_trips_through_its_file_with_each_experiment_apart(runs):
    import tempfile

    site = SiteLedger({k: PrivacyLedger(list(h), r, 1.0) for k, (h, r) in runs.items()})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "privacy-ledger.json"
        site.save(path)
        back = SiteLedger.load(path)
    assert back == site and list(back.runs) == list(site.runs)  # first-spent order kept
    # the lifetime history is every experiment's together; a projection replaces one
    assert sorted(back.lifetime()) == sorted(e for h, _ in runs.values() for e in h)
    for key in runs:
        projected = ((9.0, 0.5, 1),)
        others = [e for k, (h, _) in runs.items() if k != key for e in h]
        assert sorted(back.lifetime(key, projected)) == sorted([*others, *projected])


def test_a_format_1_site_ledger_is_read_as_one_experiment_and_still_counts(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    path.write_text(
        '{"format": 1, "history": [[1.0, 0.25, 8]], "rounds": [1, 2], "noise_multiplier": 1.0}'
    )
    site = SiteLedger.load(path)
    assert site.runs == {FORMAT_1_RUN: PrivacyLedger([(1.0, 0.25, 8)], [1, 2], 1.0)}
    assert site.lifetime() == ((1.0, 0.25, 8),)
    assert site.run("another experiment") == PrivacyLedger()


@pytest.mark.parametrize(
    ("n", "delta"), [(115, 1e-4), (9, 1e-2), (10, 1e-2), (11, 1e-3), (100_000, 1e-6)]
)
def test_default_delta_is_below_one_over_ten_n_at_a_power_of_ten(n, delta):
    assert default_delta(n) == pytest.approx(delta)
    assert default_delta(n) <= 1 / (10 * n)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_for_target_spends_at_most_the_target(accountant):
    noise = noise_for_target(3.0, 1e-4, 0.25, 80, accountant)
    spent = epsilon_of(((noise, 0.25, 80),), accountant, 1e-4)
    assert 2.95 <= spent <= 3.0


def test_an_unreachable_target_is_a_clear_error():
    with pytest.raises(FedmlError, match="cannot be reached"):
        noise_for_target(1e-9, 1e-9, 1.0, 10**6, "rdp")


def _settings(**kw) -> TrainSettings:
    return TrainSettings(**{"local_epochs": 2, "batch_size": 32, "lr": 0.1, "momentum": 0.0, **kw})


def test_plan_derives_noise_once_and_projects_the_epsilon():
    dp = DPConfig(mode="sample", target_epsilon=4.0, accountant="rdp")
    plan = plan_round(dp, PrivacyLedger(), 100, _settings(), planned_rounds=5)
    assert (plan.sample_rate, plan.steps) == (0.25, 8)  # ceil(100/32) = 4 batches x 2 epochs
    assert plan.delta == 1e-3
    assert plan.history_before == ()
    assert plan.history_after == ((plan.noise_multiplier, 0.25, 8),)
    # the noise was planned for 5 rounds: 5 rounds spend the target, not more
    five = epsilon_of(((plan.noise_multiplier, 0.25, 40),), "rdp", 1e-3)
    assert 3.95 <= five <= 4.0
    # a ledger that has a noise keeps it (a later round, or a resumed run)
    kept = plan_round(dp, PrivacyLedger(list(plan.history_after), [1], 2.5), 100, _settings(), 5)
    assert kept.noise_multiplier == 2.5
    assert kept.history_after == ((plan.noise_multiplier, 0.25, 8), (2.5, 0.25, 8))
    # an explicit noise multiplier is used as given, whatever the ledger recorded
    given = DPConfig(mode="sample", noise_multiplier=1.3)
    assert (
        plan_round(given, PrivacyLedger([], [], 2.5), 100, _settings(), 5).noise_multiplier == 1.3
    )


def test_budget_check_declines_the_round_that_would_exceed_it():
    dp = DPConfig(mode="sample", noise_multiplier=1.0, max_epsilon=6.0)
    ledger = PrivacyLedger()
    rounds = 0
    while True:
        plan = plan_round(dp, ledger, 100, _settings(), planned_rounds=1)
        try:
            client_privacy.check_budget(dp, plan, rounds + 1)
        except client_privacy.PrivacyBudgetExhausted as exc:
            assert "above its budget 6" in str(exc) and f"round {rounds + 1}" in str(exc)
            break
        ledger = PrivacyLedger(list(plan.history_after), [*ledger.rounds, rounds + 1], 1.0)
        rounds += 1
    assert rounds >= 1
    assert ledger.epsilon("rdp", plan.delta) <= 6.0 < plan.epsilon_after


# ------------------------------------------------------------------------ training
def _shard(n: int, seed: int = 0) -> Shard:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return Shard(x, (x[:, 0] > 0).astype(np.int64))


def _plan(n: int, settings: TrainSettings, noise: float = 1.0):
    return plan_round(
        DPConfig(mode="sample", noise_multiplier=noise), PrivacyLedger(), n, settings, 1
    )


def test_dp_training_takes_the_planned_steps_and_records_them():
    settings = _settings()
    model = nn.Sequential(nn.Linear(8, 2))
    plan = _plan(100, settings)
    result, history = client_privacy.train_private(
        model, _shard(100), settings, torch.device("cpu"), plan, 1.0, seed=1
    )
    assert result.steps == plan.steps == 8
    assert tuple(history) == plan.history_after
    assert math.isfinite(result.loss)


def test_dp_training_is_reproducible_with_a_seed_and_not_without():
    settings = _settings()

    def weights(seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 2))
        client_privacy.train_private(
            model, _shard(64), settings, torch.device("cpu"), _plan(64, settings), 1.0, seed
        )
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(5), weights(5))
    assert not torch.equal(weights(None), weights(None))


def test_empty_poisson_batches_count_as_steps_and_keep_the_loss_finite():
    settings = _settings(batch_size=1, local_epochs=5)  # q = 1/3: some batches are empty
    plan = _plan(3, settings)
    result, history = client_privacy.train_private(
        nn.Sequential(nn.Linear(8, 2)), _shard(3), settings, torch.device("cpu"), plan, 1.0, 3
    )
    assert result.steps == 15 and tuple(history) == plan.history_after
    assert math.isfinite(result.loss)


def test_fedprox_under_dp_pulls_the_weights_towards_the_global_model():
    settings = _settings(local_epochs=3, lr=0.5)

    def distance(mu):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 2))
        start = [p.detach().clone() for p in model.parameters()]
        s = TrainSettings(**{**settings.__dict__, "proximal_mu": mu})
        client_privacy.train_private(
            model, _shard(128), s, torch.device("cpu"), _plan(128, s, 0.5), 1.0, seed=2
        )
        pairs = zip(model.parameters(), start, strict=True)
        return sum(float((p.detach() - q).norm() ** 2) for p, q in pairs)

    assert distance(1.0) < 0.6 * distance(0.0)


def test_huge_noise_moves_the_weights_far_more_than_little_noise():
    settings = _settings()

    def change(noise):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 2))
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        plan = _plan(100, settings, noise)
        client_privacy.train_private(
            model, _shard(100), settings, torch.device("cpu"), plan, 1.0, 4
        )
        return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm())

    assert change(100.0) > 10 * change(0.01)


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(3, 2)
    )  # fmt: skip


@pytest.mark.parametrize("make_model", [lambda: nn.Sequential(nn.Linear(8, 2)), _tiny_cnn])
def test_every_grad_sample_mode_clips_the_same_gradients(make_model):
    """Ghost clipping and functorch must take exactly the steps that hooks take: same
    batches, same per-example clipping, same noise (same seeds), same weights."""
    settings = _settings(local_epochs=2, lr=0.5)
    plan = _plan(64, settings, noise=0.5)

    def trained(mode):
        torch.manual_seed(0)
        model = make_model()
        result, history = client_privacy.train_private(
            model, _shard(64), settings, torch.device("cpu"), plan, 0.1, 7, grad_sample_mode=mode
        )
        assert tuple(history) == plan.history_after and result.steps == plan.steps
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    hooks = trained("hooks")
    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in make_model().parameters()])
    assert (hooks - start).norm() > 0.01  # the steps moved the weights
    for mode in ("ghost", "functorch"):
        torch.testing.assert_close(trained(mode), hooks, rtol=1e-4, atol=1e-5)


def test_auto_picks_ghost_clipping_for_convolutions_and_hooks_otherwise():
    assert client_privacy.resolve_grad_sample_mode("auto", _tiny_cnn()) == "ghost"
    assert client_privacy.resolve_grad_sample_mode("auto", nn.Linear(8, 2)) == "hooks"
    assert client_privacy.resolve_grad_sample_mode("functorch", _tiny_cnn()) == "functorch"


def test_ghost_clipping_steps_through_empty_poisson_batches():
    settings = _settings(batch_size=1, local_epochs=5)  # q = 1/3: some batches are empty
    plan = _plan(3, settings)
    result, history = client_privacy.train_private(
        _tiny_cnn(), _shard(3), settings, torch.device("cpu"), plan, 1.0, 3, "ghost"
    )
    assert result.steps == 15 and tuple(history) == plan.history_after
    assert math.isfinite(result.loss)


def test_an_unknown_grad_sample_mode_is_refused_naming_the_choices():
    with pytest.raises(FedmlError, match=r"dp.grad_sample_mode 'ew' is unknown.*hooks, ghost"):
        load_config(None, {"dp.mode": "sample", "dp.grad_sample_mode": "ew"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dp_training_on_cuda_keeps_model_noise_and_data_on_the_gpu():
    settings = _settings()
    model = nn.Sequential(nn.Linear(8, 2))
    plan = _plan(100, settings)
    device = torch.device("cuda")
    result, history = client_privacy.train_private(
        model, _shard(100), settings, device, plan, 1.0, seed=1
    )
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert tuple(history) == plan.history_after and math.isfinite(result.loss)


# ------------------------------------------------------------------------ models
def _batchnorm_model(input_shape, num_classes):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, num_classes),
    )  # fmt: skip


def test_a_model_opacus_cannot_train_is_refused_naming_the_layer():
    with pytest.raises(FedmlError, match=r"BatchNorm.*dp.fix_model = true"):
        private_model(_batchnorm_model((8,), 2), fix=False)


def test_fix_model_lets_opacus_replace_the_layer():
    fixed = private_model(_batchnorm_model((8,), 2), fix=True)
    kinds = {type(m).__name__ for m in fixed.modules()}
    assert "BatchNorm1d" not in kinds and "GroupNorm" in kinds


def test_model_for_checks_the_model_only_when_example_level_dp_is_on(monkeypatch):
    import fedml.models as models

    monkeypatch.setitem(
        models.BUILTIN, "mlp", lambda shape, classes, hidden: _batchnorm_model(shape, classes)
    )
    assert model_for(load_config(None, {}), (8,), 2) is not None
    with pytest.raises(FedmlError, match="BatchNorm"):
        model_for(load_config(None, {"dp.mode": "sample"}), (8,), 2)
    fixed = model_for(load_config(None, {"dp.mode": "sample", "dp.fix_model": True}), (8,), 2)
    assert "GroupNorm" in {type(m).__name__ for m in fixed.modules()}


# ------------------------------------------------------------------------ the ClientApp
def _context(tmp_path, ledger_file: bool, run_config: dict) -> Context:
    node_config = {"partition-id": 0, "num-partitions": 4}
    if ledger_file:
        node_config["privacy-ledger"] = str(tmp_path / "site" / "ledger.json")
    return Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def _train_message(cfg, server_round: int) -> Message:
    from fedml.data import federation_for
    from simulations.flower_internals import claim_server_identity

    claim_server_identity(1)
    federation = federation_for(cfg)
    model = model_for(cfg, federation.input_shape, federation.num_classes)
    content = RecordDict(
        {
            "arrays": from_state_dict(model.state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    message = Message(content=content, message_type="train", dst_node_id=1)
    message.metadata.__dict__["_message_id"] = f"m{server_round}"
    return message


def test_a_restarted_site_remembers_what_it_spent(tmp_path):
    cfg = load_config(
        None, {"simulation.clients": 4, "dp.mode": "sample", "client.local_epochs": 1}
    )
    run_config = cfg.to_flat()
    first = client_train(_train_message(cfg, 1), _context(tmp_path, True, run_config))
    eps1 = first.content["metrics"][EPSILON_KEY]
    # the SuperNode restarts: a fresh Context, only the file remains
    context = _context(tmp_path, True, run_config)
    second = client_train(_train_message(cfg, 2), context)
    eps2 = second.content["metrics"][EPSILON_KEY]
    ledger = load_ledger(context, cfg)
    assert ledger.rounds == [1, 2]
    assert len(ledger.history) == 1 and ledger.history[0][2] == 2 * first_steps(cfg)
    assert eps2 > eps1
    assert eps2 == pytest.approx(
        ledger.epsilon("rdp", second.content["metrics"]["dp-delta"]), rel=1e-12
    )
    # without the file a fresh node starts from zero: what the file prevents
    fresh = client_train(_train_message(cfg, 2), _context(tmp_path / "other", False, run_config))
    assert fresh.content["metrics"][EPSILON_KEY] == pytest.approx(eps1, rel=1e-12)


def first_steps(cfg) -> int:
    from clients.app import LocalJob

    job = LocalJob.load(cfg, 0)
    return math.ceil(len(job.train) / cfg.client.batch_size) * cfg.client.local_epochs


def test_a_client_out_of_budget_declines_with_a_reason_and_does_not_train(tmp_path):
    cfg = load_config(
        None,
        {
            "simulation.clients": 4,
            "dp.mode": "sample",
            "dp.max_epsilon": 1.0,
            "client.local_epochs": 1,
        },
    )
    context = _context(tmp_path, True, cfg.to_flat())
    reply = client_train(_train_message(cfg, 1), context)
    assert reply.has_error() and reply.error.code == DECLINED_CODE
    assert "privacy budget" in reply.error.reason and "declines to train" in reply.error.reason
    assert load_ledger(context, cfg).history == []  # nothing was spent
    assert not (tmp_path / "site" / "ledger.json").exists()


def test_a_damaged_ledger_file_is_an_error_not_a_fresh_start(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text('{"format": 1, "history": [[1.0, 0.25]]}')
    context = Context(1, 1, {"privacy-ledger": str(path)}, RecordDict(), {})
    with pytest.raises(FedmlError, match="never replaced silently"):
        load_ledger(context, RunConfig())
    assert path.read_text().startswith('{"format": 1')  # untouched


def test_the_context_holds_the_ledger_when_there_is_no_file(tmp_path):
    context = Context(1, 1, {}, RecordDict(), {})
    save_ledger(context, RunConfig(), PrivacyLedger([(1.0, 0.25, 8)], [3], 1.0))
    assert load_ledger(context, RunConfig()) == PrivacyLedger([(1.0, 0.25, 8)], [3], 1.0)


def test_a_sites_file_keeps_each_experiments_ledger_apart(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    context = Context(1, 1, {"privacy-ledger": str(path)}, RecordDict(), {})
    first, second = RunConfig(), load_config(None, {"seed": 7})
    save_ledger(context, first, PrivacyLedger([(1.0, 0.25, 8)], [1], 1.0))
    save_ledger(context, second, PrivacyLedger([(2.0, 0.5, 4)], [1], 2.0))
    save_ledger(context, first, PrivacyLedger([(1.0, 0.25, 16)], [1, 2], 1.0))
    fresh = Context(1, 1, {"privacy-ledger": str(path)}, RecordDict(), {})  # a restart
    assert load_ledger(fresh, first) == PrivacyLedger([(1.0, 0.25, 16)], [1, 2], 1.0)
    assert load_ledger(fresh, second) == PrivacyLedger([(2.0, 0.5, 4)], [1], 2.0)
    site = SiteLedger.load(path)
    assert list(site.runs) == [experiment_digest(first), experiment_digest(second)]
    assert site.lifetime() == ((1.0, 0.25, 16), (2.0, 0.5, 4))


# ------------------------------------------------------------------------ the server's report
def _reply(node: int, epsilon: float | None = None, declined: bool = False) -> Message:
    from flwr.app import Error, MetricRecord

    from simulations.flower_internals import claim_server_identity

    claim_server_identity(1)
    sent = Message(RecordDict(), message_type="train", dst_node_id=node)
    sent.metadata.__dict__["_message_id"] = f"s{node}"
    if declined:
        reply = Message(Error(code=DECLINED_CODE, reason="privacy budget"), reply_to=sent)
    else:
        metrics = {"num-examples": 10, EPSILON_KEY: epsilon, "dp-delta": 1e-4}
        reply = Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=sent)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def test_report_keeps_each_clients_latest_epsilon_and_the_declines():
    report = PrivacyReport("sample")
    list(report.observe([_reply(1, 2.0), _reply(2, 4.0)]))
    list(report.observe([_reply(1, 3.0), _reply(3, declined=True)]))
    row = report.row()
    assert row["epsilon_max"] == 4.0 and row["epsilon_mean"] == 3.5 and row["delta"] == 1e-4
    assert (row["clients"], row["exhausted"], report.declined) == (2, 1, 1)
    assert report.budget_stop(num_nodes=3, min_replies=2) is None
    assert report.budget_stop(num_nodes=3, min_replies=3) == "privacy budget"
    restored = PrivacyReport("sample")
    restored.load_state_dict(report.state_dict())
    assert restored.row() == row and restored.exhausted == {3}


# ------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dp.mode": "central"}, "dp.mode 'central' is unknown"),
        ({"dp.mode": "sample", "dp.accountant": "gdp"}, "dp.accountant 'gdp'"),
        ({"dp.mode": "sample", "dp.noise_multiplier": 0.0}, "Set it, or set dp.target_epsilon"),
        ({"dp.mode": "sample", "dp.delta": 1.5}, "dp.delta must be in"),
        (
            {"dp.mode": "sample", "dp.target_epsilon": 5.0, "dp.max_epsilon": 3.0},
            "above the budget",
        ),
        ({"dp.mode": "sample", "dp.max_grad_norm": 0.0}, "dp.max_grad_norm must be > 0"),
        ({"dp.mode": "user-fixed", "dp.clip_norm": -1.0}, "dp.clip_norm must be > 0"),
    ],
)
def test_bad_dp_settings_name_the_key(overrides, message):
    with pytest.raises(FedmlError, match=message):
        load_config(None, overrides)


def test_client_level_adaptive_dp_with_its_defaults_is_accepted():
    """Flower refuses a clipped-count noise below half the noise multiplier; with
    fedml's defaults (10 clients, noise 1.0) its own default (10 / 20) was too low."""
    from strategies import build_strategy

    strategy = build_strategy(load_config(None, {"dp.mode": "user-adaptive"}))
    assert strategy.clipped_count_stddev == 1.0  # max(10 sampled / 20, noise 1.0)
    # Flower splits the budget: the model's noise rises so the total stays at 1.0
    assert strategy.noise_multiplier == pytest.approx((1.0 - 0.25) ** -0.5)
    large = build_strategy(
        load_config(None, {"dp.mode": "user-adaptive", "simulation.clients": 100})
    )
    assert large.clipped_count_stddev == 5.0  # Flower's default where it suffices


def test_opacus_alpha_range_warnings_do_not_reach_the_user():
    """The bound is valid either way; the warning would only clutter the terminal."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert epsilon_of(((0.3, 1.0, 200),), "rdp", 1e-5) > 0  # smallest alpha optimal
        assert epsilon_of(((20.0, 0.01, 1),), "rdp", 1e-5) >= 0  # largest alpha optimal


def test_the_clientapp_trains_only_as_the_run_config_says(tmp_path):
    from flwr.app import ArrayRecord

    from fedml.settings import CONTROL_RECORD

    cfg = load_config(None, {"simulation.clients": 4, "client.local_epochs": 1})
    message = _train_message(cfg, 1)
    message.content[CONTROL_RECORD] = ArrayRecord()  # SCAFFOLD's c in a fedavg run
    with pytest.raises(FedmlError, match="control variate, but the run's strategy is 'fedavg'"):
        client_train(message, _context(tmp_path, False, cfg.to_flat()))
