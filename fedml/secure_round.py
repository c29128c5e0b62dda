"""The train phase of a round under secure aggregation (`secagg.enabled`).

In place of "send the train messages, screen and aggregate the replies", a secure round
plays fedml.secagg's four exchanges with the sites the strategy sampled:

    advertise ("train.secagg_keys") -> plan over the sites that answered
    share     ("train.secagg_share") -> route the sealed shares to their holders
    train     (the strategy's train messages + the inbox) -> sum the masked updates
    unmask    ("train.secagg_unmask") -> the sum -> the example-weighted mean update

The server never holds a single site's update: each reply is a uniformly random-looking
vector, and only the sum of at least `threshold` of them can be unmasked. What that
costs is said, not skipped: the norm screen and weight caps of fedml.validation cannot
see single updates (each site clips its own update to `validation.clip_norm` before
masking instead), and the aggregate is FedAvg's weighted mean computed from the sums
(the strategy's `aggregate_train`, which would compute the same from plain replies, is
not called; only FedAvg and FedProx are allowed with secure aggregation). The server
checks the unmasked aggregate: finite, and its update within `validation.clip_norm`.
A round whose secrets cannot be recovered (fewer than `threshold` sites answered) has
no aggregate: the participation rules decide (retry, skip, stop). A site proven to
have broken the protocol (`HostileSite`: the shares it dealt rebuild no secret it
committed to) fails that attempt too, but it is named, and `Exclusions` (run state,
committed with each round) keeps it out of every later attempt and round, so a retry
goes on with the others.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedml.arrays import from_numpy, record_of, to_numpy
from fedml.config import RunConfig
from fedml.secagg import crypto
from fedml.secagg import messages as wire
from fedml.secagg.encoding import Layout, decode
from fedml.secagg.protocol import HostileSite, PublicKeys, SecAggFailure, ServerSecAgg
from fedml.validation import Tally, update_norm

log = logging.getLogger(__name__)

METRICS = ("loss",)  # what clients/secagg.py sums besides the update
LEFT_OUT = "left out: it broke secure aggregation earlier in this run"  # a failed reason


def default_threshold(sites: int) -> int:
    """A majority of the sites taking part."""
    return sites // 2 + 1


class Exclusions:
    """Sites proven to have broken secure aggregation, by node id, with why: never sent
    a secure round's messages again in this run. Run state (`state_dict()`), so a
    resumed run keeps them out too."""

    def __init__(self) -> None:
        self.sites: dict[int, str] = {}

    def add(self, site: int, why: str) -> None:
        self.sites.setdefault(site, why)

    def state_dict(self) -> dict[str, str]:
        return {str(site): why for site, why in sorted(self.sites.items())}

    def load_state_dict(self, state: dict[str, str]) -> None:
        self.sites = {int(site): why for site, why in state.items()}


class SecureRound:
    """One secure train attempt: `run` yields the masked replies' fate into `tally` and
    returns the aggregate (None when the round could not be unmasked)."""

    def __init__(
        self, cfg: RunConfig, server_round: int, attempt: int, grid: Grid, timeout: float | None
    ):
        self.cfg = cfg
        self.server_round = server_round
        self.attempt = attempt  # a retried round starts with fresh secrets
        self.grid = grid
        self.timeout = timeout
        self.row: dict[str, float | int] = {}
        self.metrics: dict[str, float] | None = None
        self.examples = 0
        self.survivors: set[int] = set()  # the sites whose inputs the unmasked sum holds

    def run(
        self,
        messages: list[Message],
        arrays: ArrayRecord,
        tally: Tally,
        observe: Callable[[Iterable[Message]], Iterator[Message]],
        excluded: set[int],
        hostile: Exclusions,
    ) -> ArrayRecord | None:
        """Play the four exchanges with the sites `messages` go to, except those in
        `hostile` (which learns of any site this attempt proves hostile); the masked
        inputs of `excluded` sites (stragglers whose partial work the strategy drops)
        are left out of the sum like a dropout's. `observe` wraps the train replies'
        stream (privacy report, device count)."""
        reference = {k: to_numpy(a) for k, a in arrays.items()}
        sa = self.cfg.secagg
        layout = Layout.of(reference, sa.clip, sa.bits, METRICS)
        total = self.masked_total(messages, layout.size, tally, observe, excluded, hostile)
        if total is None:
            return None
        try:
            decoded = decode(layout, total, reference)
            if self.cfg.dp.mode == "user-fixed" and decoded.weight != len(self.survivors):
                raise ValueError("client-level DP needs one weight per site; the sum says not")
        except ValueError as exc:
            log.warning("round %d: secure aggregation failed: %s", self.server_round, exc)
            return None
        self.examples, self.metrics = decoded.examples, decoded.metrics
        return self._checked(decoded.arrays, reference, tally)

    def masked_total(
        self,
        messages: list[Message],
        size: int,
        tally: Tally,
        observe: Callable[[Iterable[Message]], Iterator[Message]] = iter,
        excluded: frozenset[int] | set[int] = frozenset(),
        hostile: Exclusions | None = None,
        binding: bytes = b"",
    ) -> np.ndarray | None:
        """The sum (uint64, mod 2^64) of the masked inputs of `size` values that the
        sites `messages` go to send in answer to them, unmasked: the exchanges of the
        module doc, with `messages` as the third (the strategy's train messages, or the
        feature-statistics query; `binding` as the sites bind their pairwise masks to
        the query). None when it cannot be unmasked; `self.survivors` are the sites
        whose inputs it sums."""
        started = time.perf_counter()
        hostile = hostile if hostile is not None else Exclusions()
        nodes = {
            m.metadata.dst_node_id: m
            for m in messages
            if m.metadata.dst_node_id not in hostile.sites
        }
        sa = self.cfg.secagg
        threshold = sa.threshold or default_threshold(len(nodes))
        server = ServerSecAgg(self.server_round, threshold, sa.neighbours)
        self.row = {"sampled": len(nodes), "shared": 0, "unmasked": 0, "dropped": 0}
        self.row["threshold"] = threshold
        if len(nodes) < len(messages):  # sampled, never sent: failed, and said why
            self.row["excluded"] = len(messages) - len(nodes)
            tally.failed += self.row["excluded"]
            tally.failed_reasons[LEFT_OUT] += self.row["excluded"]
        total = None
        try:
            advertised = self._advertise(nodes)
            plan, holder_keys = server.holder_keys(advertised)
            shared = self._share(plan, holder_keys)
            inbox = server.route(shared)
            self.row["shared"] = len(shared)
            for reply in observe(self._masked_inputs(nodes, shared, inbox)):
                if not tally.answered(reply):
                    continue
                node = reply.metadata.src_node_id
                masked = wire.masked_from(reply.content, size)
                if masked is None or node not in shared or node in server.survivors:
                    tally.rejected["malformed masked input"] += 1  # as if it dropped out
                elif node not in excluded:
                    server.add(node, masked)
            self.row["unmasked"], self.row["dropped"] = len(server.survivors), len(server.dropped)
            answers = self._unmask(server.survivors, server.dropped)
            total = server.unmask(answers, binding)
            self.survivors = set(server.survivors)
        except HostileSite as exc:
            hostile.add(exc.site, str(exc))
            self.row["hostile"] = exc.site
            log.warning(
                "round %d: secure aggregation failed: %s; that site is left out of every "
                "later secure round of this run",
                self.server_round,
                exc,
            )
        except (SecAggFailure, ValueError) as exc:
            log.warning("round %d: secure aggregation failed: %s", self.server_round, exc)
        self.row["seconds"] = round(time.perf_counter() - started, 4)
        return total

    # -- the exchanges -------------------------------------------------------------------
    def _ask(self, node: int, action: str, records: dict) -> Message:
        return Message(RecordDict(records), dst_node_id=node, message_type=f"train.{action}")

    def _replies(self, messages: list[Message]) -> Iterator[Message]:
        """The replies without an error (a failed site simply drops out of the round)."""
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            if not reply.has_error():
                yield reply

    def _advertise(self, nodes: dict[int, Message]) -> dict[int, PublicKeys]:
        ask = [
            self._ask(n, wire.KEYS_ACTION, {wire.ROUND: self._who(n, attempt=self.attempt)})
            for n in sorted(nodes)
        ]
        advertised: dict[int, PublicKeys] = {}
        for reply in self._replies(ask):
            record = reply.content.config_records.get(wire.ROUND, ConfigRecord())
            c, s = record.get("c"), record.get("s")
            seen = {key for pair in advertised.values() for key in pair}
            if (
                reply.metadata.src_node_id in nodes
                and crypto.usable_public_key(c)
                and crypto.usable_public_key(s)
                and c != s
                and not {c, s} & seen  # a key copied from another site is refused
            ):
                advertised[reply.metadata.src_node_id] = (c, s)  # type: ignore[assignment]
        return advertised

    def _share(self, plan, holder_keys: dict[int, dict[int, PublicKeys]]) -> dict:
        ask = [
            self._ask(
                n,
                wire.SHARE_ACTION,
                {
                    wire.ROUND: wire.plan_record(plan, n),
                    wire.KEYS: wire.keys_record(holder_keys[n]),
                },
            )
            for n in plan.sampled
        ]
        shared = {}
        for reply in self._replies(ask):
            node = reply.metadata.src_node_id
            records = reply.content.config_records
            sealed = wire.from_node_record(records.get(wire.SEALED))
            digests = wire.from_node_record(records.get(wire.DIGESTS))
            commitment = records.get(wire.COMMITMENT, ConfigRecord()).get("seed")
            holders = set(plan.holders(node))
            if (
                node in plan.sampled
                and set(digests) == holders
                and all(len(d) == 64 for d in digests.values())
                and set(sealed) == holders - {node}  # a share for every other holder
                and isinstance(commitment, bytes)
                and len(commitment) == 32
            ):
                shared[node] = (sealed, digests, commitment)
        return shared

    def _masked_inputs(
        self, nodes: dict[int, Message], shared: dict, inbox: dict
    ) -> Iterator[Message]:
        """The third exchange's messages (the strategy's train messages, or the feature
        statistics query) to the sites that shared, plus who they are and the sealed
        shares they hold."""
        outgoing = []
        for node in sorted(shared):
            message = nodes[node]
            message.content = RecordDict(
                {
                    **message.content,
                    wire.ROUND: self._who(node),
                    wire.INBOX: wire.by_node(inbox.get(node, {})),
                }
            )
            outgoing.append(message)
        return self.grid.send_and_receive(outgoing, timeout=self.timeout)

    def _unmask(self, survivors: set[int], dropped: set[int]) -> dict[int, dict[int, bytes]]:
        request = {"survivors": sorted(survivors), "dropped": sorted(dropped)}
        ask = [
            self._ask(n, wire.UNMASK_ACTION, {wire.ROUND: self._who(n, **request)})
            for n in sorted(survivors)
        ]
        return {
            reply.metadata.src_node_id: wire.from_node_record(
                reply.content.config_records.get(wire.SHARES)
            )
            for reply in self._replies(ask)
        }

    def _who(self, node: int, **more: int | list[int]) -> ConfigRecord:
        return ConfigRecord({"node": node, "round": self.server_round, **more})

    # -- the aggregate -------------------------------------------------------------------
    def _checked(
        self, mean: dict[str, np.ndarray], reference: dict[str, np.ndarray], tally: Tally
    ) -> ArrayRecord | None:
        """The unmasked aggregate, if it can be one: finite, and its update no longer
        than the sites' clip allows (`validation.clip_norm`, or `dp.clip_norm` under
        client-level DP; 0: no norm check)."""
        floats = [k for k, v in mean.items() if np.issubdtype(v.dtype, np.floating)]
        if not all(np.isfinite(mean[k]).all() for k in floats):
            tally.rejected["non-finite aggregate"] += 1
            return None
        dp = self.cfg.dp
        limit = dp.clip_norm if dp.mode == "user-fixed" else self.cfg.validation.clip_norm
        if limit > 0:
            norm = update_norm(mean, reference)
            quantum = 2 * self.cfg.secagg.clip / (2**self.cfg.secagg.bits - 1)
            if norm > limit + quantum * math.sqrt(sum(mean[k].size for k in floats)):
                tally.rejected["aggregate beyond clip_norm"] += 1
                return None
        return record_of({k: from_numpy(v) for k, v in mean.items()})
