"""The round loop's typed contracts answer for real parts as the loop needs."""

from __future__ import annotations

from fedml.components import RoundComponents
from fedml.config import load_config
from fedml.contracts import NodeStateGrid, Retractable, is_proximal, is_stateful
from simulations.inprocess import InProcessGrid
from strategies import build_strategy


def _strategy(**overrides):
    return build_strategy(load_config(None, {"simulation.clients": 4, **overrides}))


def test_a_user_dp_wrapper_is_proximal_exactly_when_its_inner_strategy_is():
    assert is_proximal(_strategy(**{"strategy.name": "fedprox"}))
    assert not is_proximal(_strategy())
    wrapped_fedprox = _strategy(**{"strategy.name": "fedprox", "dp.mode": "user-fixed"})
    assert is_proximal(wrapped_fedprox) and wrapped_fedprox.proximal_mu == 0.01
    assert not is_proximal(_strategy(**{"dp.mode": "user-fixed"}))


def test_stateful_needs_both_methods_callable():
    class OnlySaves:
        def state_dict(self):
            return {}

    class NamesOnly:
        state_dict = load_state_dict = None

    assert not is_stateful(OnlySaves()) and not is_stateful(NamesOnly())
    assert is_stateful(_strategy()) and is_stateful(
        _strategy(**{"dp.mode": "user-adaptive", "dp.noise_multiplier": 0.1})
    )
    assert isinstance(_strategy(**{"strategy.name": "fedadam"}), Retractable)
    assert not isinstance(_strategy(), Retractable)


def test_components_commit_under_their_field_names_and_restore_what_they_committed():
    cfg = load_config(None, {"simulation.clients": 4, "simulation.stragglers": 0.5})
    parts = RoundComponents.for_run(cfg, build_strategy(cfg))
    state = parts.capture()
    assert list(state) == [
        "strategy", "stragglers", "dropout", "controls", "privacy", "screening", "hostile",
        "scaling",
    ]  # fmt: skip
    parts.stragglers.rng.random()  # the RNG moves on ...
    parts.hostile.add(3, "site 3 dealt shares of another self-mask seed")
    parts.restore(state)  # ... and comes back
    assert parts.capture() == state


def test_a_part_newer_than_a_commit_starts_fresh_without_a_warning(caplog):
    """A run committed before `hostile` existed resumes: that part starts as in a fresh
    run; only a part that cannot hold state at all is warned about."""
    import logging

    cfg = load_config(None, {"simulation.clients": 4})
    parts = RoundComponents.for_run(cfg, build_strategy(cfg))
    older = {k: v for k, v in parts.capture().items() if k != "hostile"}
    with caplog.at_level(logging.WARNING):
        parts.restore(older)
    assert parts.hostile.sites == {} and "no committed state" not in caplog.text


def test_the_in_process_grid_keeps_node_state_and_flowers_grid_does_not():
    from flwr.serverapp import Grid

    from clients.app import app

    grid = InProcessGrid(app, 2, {})
    assert isinstance(grid, NodeStateGrid)
    assert not issubclass(Grid, NodeStateGrid)
