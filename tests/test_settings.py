"""`TrainSettings`: the one definition of what a train message asks of a client."""

from __future__ import annotations

import dataclasses

from flwr.app import ConfigRecord
from hypothesis import given
from hypothesis import strategies as st

from fedml.config import ClientConfig
from fedml.settings import NUM_CLASSES_KEY, PROXIMAL_MU_KEY, TrainSettings, message_key

settings = st.builds(
    TrainSettings,
    local_epochs=st.integers(1, 50),
    batch_size=st.integers(1, 4096),
    lr=st.floats(1e-6, 10.0),
    optimizer=st.sampled_from(["sgd", "adam"]),
    momentum=st.floats(0.0, 0.99),
    weight_decay=st.floats(0.0, 1.0),
    proximal_mu=st.floats(0.0, 10.0),
)


@given(settings, st.integers(2, 1000))
def test_a_record_reads_back_as_the_settings_it_was_written_from(sent, num_classes):
    record = sent.to_record(num_classes)
    assert record[NUM_CLASSES_KEY] == num_classes
    assert TrainSettings.from_record(record, defaults=TrainSettings(lr=123.0)) == sent


def test_keys_a_message_lacks_keep_the_defaults_and_types_follow_them():
    """A stock Flower strategy sends only "server-round": the run's own settings apply.
    Values arrive as a ConfigRecord allows (an int lr, a float epoch count) and are
    coerced to the field's type."""
    defaults = TrainSettings.for_round(ClientConfig(local_epochs=3, momentum=0.5), lr=0.2)
    assert TrainSettings.from_record(ConfigRecord({"server-round": 4}), defaults) == defaults
    got = TrainSettings.from_record(ConfigRecord({"lr": 1, "local-epochs": 2.0}), defaults)
    assert (got.lr, got.local_epochs) == (1.0, 2)
    assert isinstance(got.lr, float) and isinstance(got.local_epochs, int)


def test_defaults_are_the_run_configs_and_keys_are_flowers_dashed_names():
    client = ClientConfig()
    ours = TrainSettings()
    for f in dataclasses.fields(ClientConfig):
        if hasattr(ours, f.name):
            assert getattr(ours, f.name) == getattr(client, f.name), f.name
    record = TrainSettings(proximal_mu=0.5).to_record(10)
    assert record[PROXIMAL_MU_KEY] == 0.5 and record["local-epochs"] == client.local_epochs
    assert message_key("weight_decay") == "weight-decay"
    # FedAvg's messages carry no mu: the strategy that uses it sends it
    assert PROXIMAL_MU_KEY not in TrainSettings().to_record(10)
