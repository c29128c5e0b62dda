"""A data site's policy: the file checked strictly, each rule refusing what breaks it, and
the site's own privacy ledger judging DP-SGD rounds before any data is read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from fedml.config import load_config
from fedml.deploy.policy_check import (
    LEDGER_KEY,
    POLICY_KEY,
    ROWS_KEY,
    Judgement,
    judge,
)
from fedml.privacy import default_delta, epsilon_of
from fedml.privacy_ledger import PrivacyLedger, SiteLedger, plan_round
from fedml.secagg import messages as wire
from fedml.settings import SERVER_ROUND_KEY, TrainSettings
from fedml.site_policy import (
    PolicyFileError,
    SitePolicy,
    TaskFacts,
    load_policy,
    parse_policy,
    privacy_refusal,
    refusal,
)
from simulations.flower_internals import claim_server_identity

STRICT = """
[privacy]
require = "sample"
min_noise_multiplier = 0.8
max_epsilon_per_run = 8.0
max_epsilon_total = 20
max_delta = 1e-4
min_batch_size = 16
[training]
models = ["logreg", "mlp"]
strategies = ["fedavg", "fedprox"]
max_local_epochs = 5
max_rounds = 100
[aggregation]
require_secagg = true
[server]
certificate_sha256 = "AB:CD:%s"
""" % ("ef" * 30)


def test_a_full_policy_reads_as_written():
    policy = parse_policy(STRICT)
    assert policy.privacy.require == "sample"
    assert (policy.privacy.min_noise_multiplier, policy.privacy.max_epsilon_total) == (0.8, 20.0)
    assert policy.privacy.min_batch_size == 16 and policy.privacy.max_delta == 1e-4
    assert policy.training.models == ("logreg", "mlp")
    assert policy.training.strategies == ("fedavg", "fedprox")
    assert (policy.training.max_local_epochs, policy.training.max_rounds) == (5, 100)
    assert policy.aggregation.require_secagg is True
    assert policy.server.certificate_sha256 == "abcd" + "ef" * 30  # colons and case gone
    assert "privacy.max_epsilon_total = 20.0" in policy.summary()


def test_an_empty_policy_restricts_nothing():
    assert parse_policy("") == SitePolicy()
    assert SitePolicy().summary() == ["(no rule: the policy restricts nothing)"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[privcy]\nrequire = 'sample'", "unknown section [privcy] (did you mean privacy?)"),
        (
            "[privacy]\nmax_epsilon = 3",
            "unknown key privacy.max_epsilon (did you mean privacy.max_epsilon_total?)",
        ),
        ("[training]\nmax_epochs = 3", "did you mean training.max_local_epochs?"),
        ("[privacy]\nrequire = 'sampel'", "did you mean sample?"),
        ("[privacy]\nmin_noise_multiplier = -1.0", "must be a finite number > 0"),
        ("[privacy]\nmin_noise_multiplier = 'high'", "must be a number"),
        ("[privacy]\nmax_epsilon_total = nan", "must be a finite number > 0"),
        ("[privacy]\nmax_epsilon_total = true", "must be a number"),
        ("[privacy]\nmax_delta = 1.5", "privacy.max_delta must be below 1"),
        ("[training]\nmax_local_epochs = 1.5", "must be a whole number >= 1"),
        ("[training]\nmax_rounds = 0", "must be a whole number >= 1"),
        ("[training]\nmodels = 'logreg'", "must be a list of names"),
        ("[training]\nmodels = ['']", "must be a list of names"),
        ("[aggregation]\nrequire_secagg = 'yes'", "must be true or false"),
        ("privacy = 3", "must be a [privacy] table"),
        ("[server]\ncertificate_sha256 = 'abc'", "64 hex digits"),
        (
            "[privacy]\nmax_epsilon_per_run = 9\nmax_epsilon_total = 3",
            "max_epsilon_per_run (9.0) is above privacy.max_epsilon_total (3.0)",
        ),
        ("[privacy\n", "is not valid TOML"),
    ],
)
def test_a_wrong_policy_file_is_one_clear_error(text, says):
    with pytest.raises(PolicyFileError) as caught:
        parse_policy(text, "policy.toml")
    assert says in str(caught.value) and str(caught.value).startswith("policy.toml")


def test_a_policy_file_that_is_not_a_regular_file_is_an_error(tmp_path):
    with pytest.raises(PolicyFileError, match="Cannot read the policy file"):
        load_policy(tmp_path / "missing.toml")
    with pytest.raises(PolicyFileError, match="Cannot read the policy file"):
        load_policy(tmp_path)  # a folder


# ------------------------------------------------------------------------- the rules
COMPLIANT = TaskFacts(
    kind="train",
    model="logreg",
    strategy="fedavg",
    rounds=10,
    server_round=3,
    dp_mode="sample",
    secagg=True,
    masked=True,
    epochs=2,
    work="2 epochs",
    batch_size=32,
)


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"model": "cnn"}, "training.models"),
        ({"strategy": "krum"}, "training.strategies"),
        ({"rounds": 101}, "training.max_rounds"),
        ({"server_round": 500}, "training.max_rounds"),
        ({"dp_mode": "off"}, "privacy.require"),
        ({"dp_mode": "user-fixed"}, "privacy.require"),
        ({"secagg": False}, "aggregation.require_secagg"),
        ({"masked": False}, "aggregation.require_secagg"),
        ({"epochs": 6, "work": "6 epochs"}, "training.max_local_epochs"),
        ({"batch_size": 8}, "privacy.min_batch_size"),
    ],
)
def test_each_rule_refuses_the_task_that_breaks_it_and_names_itself(change, rule):
    policy = parse_policy(STRICT)
    assert refusal(policy, COMPLIANT) is None
    why = refusal(policy, dataclasses.replace(COMPLIANT, **change))
    assert why is not None and why.startswith(f"refused by the site's policy ({rule}): ")


def test_rules_on_a_rounds_training_do_not_apply_to_other_messages():
    policy = parse_policy(STRICT)
    for kind in ("evaluate", "step"):  # no update leaves: batches and masks aside
        task = dataclasses.replace(COMPLIANT, kind=kind, masked=False, batch_size=1)
        assert refusal(policy, task) is None
    step = dataclasses.replace(COMPLIANT, kind="step", epochs=50)  # a secagg step trains not
    assert refusal(policy, step) is None
    tuned = dataclasses.replace(COMPLIANT, kind="evaluate", epochs=50)  # fine-tuning does
    assert "(training.max_local_epochs)" in str(refusal(policy, tuned))
    # an unmasked statistics query is refused, and run-level rules hold for all
    stats = dataclasses.replace(COMPLIANT, kind="statistics", masked=False)
    assert "aggregation.require_secagg" in str(refusal(policy, stats))
    evaluate = dataclasses.replace(COMPLIANT, kind="evaluate", dp_mode="off")
    assert "privacy.require" in str(refusal(policy, evaluate))


def test_a_site_requiring_nothing_accepts_anything():
    loose = dataclasses.replace(COMPLIANT, dp_mode="off", secagg=False, masked=False, epochs=99)
    assert refusal(SitePolicy(), loose) is None


@pytest.mark.parametrize(
    ("noise", "delta", "run", "total", "rule"),
    [
        (0.5, 1e-5, (0, 1), (0, 1), "privacy.min_noise_multiplier"),
        (1.0, 1e-3, (0, 1), (0, 1), "privacy.max_delta"),
        (1.0, 1e-5, (7, 8.5), (7, 8.5), "privacy.max_epsilon_per_run"),
        (1.0, 1e-5, (1, 2), (19, 20.5), "privacy.max_epsilon_total"),
        (1.0, 1e-5, (7, 8.0), (19, 20.0), None),  # exactly at the limits: allowed
    ],
)
def test_privacy_rules_judge_a_rounds_plan(noise, delta, run, total, rule):
    why = privacy_refusal(parse_policy(STRICT), noise, delta, run, total, 1e-4)
    if rule is None:
        assert why is None
    else:
        assert why is not None and f"({rule})" in why


# ------------------------------------------------- judging a task before any data is read
ROWS = 200  # the prepared rows fedml client names in the node config
TRAIN_ROWS = 160  # less the validation split (data.val_fraction 0.2)


def _task(
    tmp_path: Path,
    policy: str | None,
    overrides: dict,
    config: dict | None = None,
    kind: str = "train",
    masked: bool = False,
) -> tuple[Message, Context]:
    claim_server_identity(1)
    cfg = load_config(None, overrides)
    content = RecordDict(
        {
            "arrays": ArrayRecord(),
            "config": ConfigRecord({SERVER_ROUND_KEY: 1, **(config or {})}),
        }
    )
    if masked:
        content[wire.ROUND] = ConfigRecord({"node": 1})
    message = Message(content, dst_node_id=5, message_type=kind)
    node = {
        "data-path": str(tmp_path / "no-such-data"),  # judged without it: never read
        ROWS_KEY: ROWS,
        LEDGER_KEY: str(tmp_path / "privacy-ledger.json"),
    }
    if policy is not None:
        (tmp_path / "policy.toml").write_text(policy)
        node[POLICY_KEY] = str(tmp_path / "policy.toml")
    return message, Context(1, 5, node, RecordDict(), cfg.to_flat())


DP = {"dp.mode": "sample", "dp.noise_multiplier": 1.0, "client.local_epochs": 1}
BUDGETS = "[privacy]\nrequire = 'sample'\nmin_noise_multiplier = 0.8\n"


def test_a_site_requiring_dp_sgd_refuses_a_run_without_it(tmp_path):
    message, context = _task(tmp_path, BUDGETS, {})
    verdict = judge(message, context)
    assert "(privacy.require)" in str(verdict.refusal) and "'off'" in str(verdict.refusal)
    assert not (tmp_path / "no-such-data").exists()


def test_the_noise_floor_judges_the_noise_the_site_derives_from_a_target(tmp_path):
    low = {"dp.mode": "sample", "dp.target_epsilon": 50.0, "rounds": 2}
    message, context = _task(tmp_path, BUDGETS, low)
    assert "(privacy.min_noise_multiplier)" in str(judge(message, context).refusal)
    ok = {"dp.mode": "sample", "dp.target_epsilon": 1.0, "rounds": 2}
    message, context = _task(tmp_path, BUDGETS, ok)
    assert judge(message, context).refusal is None


def test_a_message_asking_for_more_epochs_or_smaller_batches_is_refused(tmp_path):
    policy = BUDGETS + "min_batch_size = 16\n[training]\nmax_local_epochs = 2\n"
    message, context = _task(tmp_path, policy, DP, {"local-epochs": 3})
    assert "(training.max_local_epochs)" in str(judge(message, context).refusal)
    message, context = _task(tmp_path, policy, DP, {"batch-size": 4})
    assert "(privacy.min_batch_size)" in str(judge(message, context).refusal)
    # local steps count as the epochs of this site's rows they amount to
    steps = {"client.local_steps": 0}
    message, context = _task(
        tmp_path, "[training]\nmax_local_epochs = 2\n", steps, {"local-steps": 30, "batch-size": 16}
    )
    why = str(judge(message, context).refusal)
    assert "30 steps (3 epochs of this site's rows)" in why  # 160 rows / 16: 10 a pass


def test_an_unmasked_update_is_refused_when_the_site_requires_secure_aggregation(tmp_path):
    policy = "[aggregation]\nrequire_secagg = true\n"
    secure = {"secagg.enabled": True, "participation.min_replies": 3}
    message, context = _task(tmp_path, policy, secure)
    assert "unmasked reply" in str(judge(message, context).refusal)
    message, context = _task(tmp_path, policy, secure, masked=True)
    assert judge(message, context).refusal is None


def _spend(tmp_path: Path, cfg_overrides: dict, rounds: int) -> None:
    """What `rounds` honest rounds of this experiment leave in the site's ledger."""
    cfg = load_config(None, cfg_overrides)
    from fedml.config import experiment_digest

    path = tmp_path / "privacy-ledger.json"
    site = SiteLedger.load(path)
    ledger = site.run(experiment_digest(cfg))
    settings = TrainSettings.for_round(cfg.client, cfg.client.lr)
    for r in range(rounds):
        plan = plan_round(cfg.dp, ledger, TRAIN_ROWS, settings, cfg.rounds)
        ledger = PrivacyLedger(list(plan.history_after), [*ledger.rounds, r + 1], 1.0)
    site.runs[experiment_digest(cfg)] = ledger
    site.save(path)


def test_budgets_are_judged_by_the_sites_own_ledger_per_run_and_in_total(tmp_path):
    delta = default_delta(TRAIN_ROWS)  # 1e-4, fedml's default

    def after(rounds: int) -> float:  # 160 rows, batches of 32: 5 steps a round, q = 1/5
        return epsilon_of(((1.0, 1 / 5, 5 * rounds),), "rdp", delta)

    limit = (after(2) + after(3)) / 2  # a third round would cross it
    per_run = f"[privacy]\nmax_epsilon_per_run = {limit}\n"
    message, context = _task(tmp_path, per_run, DP)
    verdict = judge(message, context)
    assert verdict.refusal is None and verdict.site_delta == delta
    _spend(tmp_path, DP, 2)
    why = str(judge(message, context).refusal)
    assert "(privacy.max_epsilon_per_run)" in why
    assert f"from {after(2):.4g} to {after(3):.4g}" in why  # the site's own figures
    # another experiment has its own run budget, but the site's total counts both
    other = {**DP, "seed": 5}
    message, context = _task(tmp_path, per_run, other)
    assert judge(message, context).refusal is None
    total = f"[privacy]\nmax_epsilon_total = {limit}\n"
    message, context = _task(tmp_path, total, other)
    why = str(judge(message, context).refusal)
    assert "(privacy.max_epsilon_total)" in why and "the site's total" in why


def test_what_a_task_spent_comes_from_the_sites_ledger(tmp_path):
    message, context = _task(tmp_path, None, DP)
    verdict = judge(message, context)
    assert verdict.refusal is None and verdict.spent() == {
        "epsilon_task": 0.0,
        "epsilon_run": 0.0,
        "epsilon_total": 0.0,
        "delta": 1e-4,
    }
    _spend(tmp_path, DP, 1)  # as the ClientApp saves it
    spent = verdict.spent()
    assert spent is not None and spent["epsilon_task"] == spent["epsilon_total"] > 0
    assert Judgement().spent() is None  # no DP-SGD: nothing to account


def test_a_broken_policy_refuses_every_task_until_it_is_fixed(tmp_path):
    message, context = _task(tmp_path, "[privacy]\nrequire = 'maybe'\n", {})
    why = str(judge(message, context).refusal)
    assert why.startswith("refused: the site's policy cannot be read") and "sample" in why


def test_hostile_message_settings_are_refused_not_raised(tmp_path):
    message, context = _task(tmp_path, BUDGETS, DP, {"batch-size": "many"})
    assert "the message's settings are not valid" in str(judge(message, context).refusal)
    message, context = _task(tmp_path, BUDGETS, DP, {"batch-size": 0})
    assert "cannot judge this round" in str(judge(message, context).refusal)


# --------------------------------------------------------------- a property of the rules
facts = st.builds(
    TaskFacts,
    kind=st.sampled_from(["train", "evaluate", "statistics", "step", "other"]),
    model=st.sampled_from(["logreg", "mlp", "cnn"]),
    strategy=st.sampled_from(["fedavg", "fedprox", "krum"]),
    rounds=st.integers(1, 200),
    server_round=st.integers(0, 200),
    dp_mode=st.sampled_from(["off", "sample", "user-fixed", "user-adaptive"]),
    secagg=st.booleans(),
    masked=st.booleans(),
    epochs=st.integers(1, 20),
    work=st.just("some epochs"),
    batch_size=st.integers(1, 128),
)
RULES = [
    ("privacy", "require"), ("privacy", "min_batch_size"), ("training", "models"),
    ("training", "strategies"), ("training", "max_local_epochs"), ("training", "max_rounds"),
    ("aggregation", "require_secagg"),
]  # fmt: skip


@given(facts, st.sets(st.sampled_from(RULES)))
def test_leaving_rules_out_never_refuses_more_and_an_empty_policy_refuses_nothing(task, dropped):
    strict = parse_policy(STRICT)
    assert refusal(SitePolicy(), task) is None
    looser = strict
    for section, rule in dropped:  # each left out as if not written
        default = getattr(SitePolicy(), section)
        part = dataclasses.replace(getattr(looser, section), **{rule: getattr(default, rule)})
        looser = dataclasses.replace(looser, **{section: part})
    if refusal(strict, task) is None:
        assert refusal(looser, task) is None
    why = refusal(looser, task)
    if why is not None:  # what still refuses is a rule the looser policy kept
        rule = why.split("(")[1].split(")")[0]
        assert tuple(rule.split(".")) not in dropped


# ------------------------------------------------- what a hostile server tried next
def test_a_config_that_is_not_a_config_record_is_refused(tmp_path):
    from flwr.app import MetricRecord

    message, context = _task(tmp_path, BUDGETS, DP)
    message.content["config"] = MetricRecord({"local-epochs": 50, "server-round": 1})
    assert "'config' is not a ConfigRecord" in str(judge(message, context).refusal)


def test_every_message_type_that_trains_is_judged_and_unknown_ones_are_refused(tmp_path):
    policy = "[training]\nmax_local_epochs = 2\n"
    message, context = _task(tmp_path, policy, {}, {"local-epochs": 3}, kind="train.default")
    assert "(training.max_local_epochs)" in str(judge(message, context).refusal)
    message, context = _task(tmp_path, policy, {}, kind="train.mine")
    assert "serves no message of type 'train.mine'" in str(judge(message, context).refusal)
    message, context = _task(tmp_path, None, {}, kind="evaluate.other")  # policy or not
    assert "serves no message of type" in str(judge(message, context).refusal)


def test_fine_tuning_at_evaluation_counts_as_local_training(tmp_path):
    policy = "[training]\nmax_local_epochs = 2\n"
    tuned = {"client.fine_tune_epochs": 3}
    message, context = _task(tmp_path, policy, tuned, {"fine-tune-epochs": 3}, kind="evaluate")
    why = str(judge(message, context).refusal)
    assert "(training.max_local_epochs)" in why and "3 epochs of fine-tuning" in why
    # a message asking for more than the run config is judged as the ClientApp runs it:
    # capped at the run's (none under DP-SGD, which forbids fine-tuning)
    message, context = _task(tmp_path, policy, DP, {"fine-tune-epochs": 10**6}, kind="evaluate")
    assert judge(message, context).refusal is None


def test_training_that_amounts_to_another_strategy_is_judged_as_that_strategy(tmp_path):
    from fedml.settings import CONTROL_RECORD

    policy = "[training]\nstrategies = ['fedavg']\n"
    message, context = _task(tmp_path, policy, {}, {"proximal-mu": 0.5})
    assert "strategy 'fedprox'" in str(judge(message, context).refusal)
    message, context = _task(tmp_path, policy, {})
    message.content[CONTROL_RECORD] = ArrayRecord()
    assert "strategy 'scaffold'" in str(judge(message, context).refusal)


def test_a_value_no_rule_foresaw_is_a_refusal_not_a_crash(tmp_path):
    message, context = _task(tmp_path, BUDGETS, DP, {"local-epochs": float("inf")})
    assert str(judge(message, context).refusal).startswith("refused: the site cannot judge")
    message, context = _task(tmp_path, None, DP, {"batch-size": 0})  # no policy: still judged
    assert judge(message, context).refusal is not None


def test_each_task_checks_the_pinned_certificate_the_site_joined_with(tmp_path):
    from fedml.deploy.site_audit import SERVER_CERTIFICATE_KEY

    pinned = "a" * 64
    policy = f'[server]\ncertificate_sha256 = "{pinned}"\n'
    message, context = _task(tmp_path, policy, {})
    assert "(server.certificate_sha256)" in str(judge(message, context).refusal)
    context.node_config[SERVER_CERTIFICATE_KEY] = pinned
    assert judge(message, context).refusal is None
