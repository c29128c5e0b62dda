"""A site's side of secure aggregation (fedml/secagg) on the ClientApp.

The site answers the server's four exchanges of a secure round: it advertises two
public keys, shares its secrets with its holders, trains as usual and replies with its
update masked (never the update itself; before round 1, its feature statistics
instead), and finally returns the shares the server needs to unmask the sum. Before
masking, the site clips its own update to `validation.clip_norm` (the server cannot
screen single updates any more). Between the messages its side of the round waits in
`Context.state`; it is removed after unmasking.

Keys, seeds and quantisation follow the run seed for a simulated client (a run replays
bit for bit); a data site draws them from OS entropy.
"""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedml.config import RunConfig
from fedml.secagg import messages as wire
from fedml.secagg.encoding import Layout, encode
from fedml.secagg.protocol import SiteSecAgg
from fedml.validation import clip_to_norm

METRICS = ("loss",)  # the train metrics a secure round sums


def site_secret(
    cfg: RunConfig, server_round: int, attempt: int, partition_id: int | None
) -> bytes | None:
    """96 bytes from the run seed for a simulated client, fresh for each attempt of a
    round (a retried round must not reuse a seed whose share an earlier attempt
    revealed); None (OS entropy) at a data site."""
    if partition_id is None:
        return None
    label = f"fedml secagg secret {cfg.seed} {server_round} {attempt} {partition_id}"
    return hashlib.shake_256(label.encode()).digest(96)


def advertise(msg: Message, context: Context, cfg: RunConfig, partition_id: int | None) -> Message:
    """Step 1: a fresh side of the round, and its two public keys."""
    info = msg.content.config_records[wire.ROUND]
    node, server_round = int(info["node"]), int(info["round"])  # type: ignore[arg-type]
    attempt = int(info.get("attempt", 0))  # type: ignore[arg-type]
    secret = site_secret(cfg, server_round, attempt, partition_id)
    site = SiteSecAgg(node, server_round, secret)
    _save(context, site)
    c, s = site.advertise()
    return Message(RecordDict({wire.ROUND: ConfigRecord({"c": c, "s": s})}), reply_to=msg)


def share(msg: Message, context: Context) -> Message:
    """Step 2: this site's shares, sealed for each holder, their digests, and its
    commitment to its self-mask seed."""
    site = _load(context, msg)
    plan = wire.plan_from(msg.content.config_records[wire.ROUND])
    keys = wire.keys_from(msg.content.config_records.get(wire.KEYS))
    sealed, digests, commitment = site.share(plan, keys)
    _save(context, site)
    content = RecordDict(
        {
            wire.SEALED: wire.by_node(sealed),
            wire.DIGESTS: wire.by_node(digests),
            wire.COMMITMENT: ConfigRecord({"seed": commitment}),
        }
    )
    return Message(content, reply_to=msg)


def masked_update(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    trained: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    num_examples: int,
    metrics: dict[str, float],
    rng: np.random.Generator,
) -> RecordDict:
    """Step 3: the reply content of a secure train message: the masked vector of the
    clipped update (see fedml.secagg.encoding) instead of the trained arrays. Under
    client-level DP (`user-fixed`) the update is clipped to `dp.clip_norm` and weighs 1,
    as Flower's client-side fixed clipping does (the server adds the noise)."""
    site = _load(context, msg)
    user_dp = cfg.dp.mode == "user-fixed"
    clip_norm = cfg.dp.clip_norm if user_dp else cfg.validation.clip_norm
    clipped = clip_to_norm(trained, reference, clip_norm)
    layout = Layout.of(reference, cfg.secagg.clip, cfg.secagg.bits, METRICS)
    weight = 1 if user_dp else num_examples
    vector = encode(layout, clipped, reference, num_examples, rng, metrics, weight)
    return _masked(msg, context, site, vector)


def masked_input(msg: Message, context: Context, vector: np.ndarray, binding: bytes) -> RecordDict:
    """Step 3 for any other input (the feature statistics, in fixed point): the reply
    content holding `vector` (uint64) masked, never `vector` itself; `binding` (what the
    encoding depends on) enters the pairwise masks."""
    return _masked(msg, context, _load(context, msg), vector, binding)


def _masked(
    msg: Message, context: Context, site: SiteSecAgg, vector: np.ndarray, binding: bytes = b""
) -> RecordDict:
    inbox = wire.from_node_record(msg.content.config_records.get(wire.INBOX))
    masked = site.masked(vector, inbox, binding)
    _save(context, site)
    return RecordDict({"arrays": wire.masked_record(masked)})


def unmask(msg: Message, context: Context) -> Message:
    """Step 4: the shares the server asks for; the round's secrets leave the state."""
    site = _load(context, msg)
    info = msg.content.config_records[wire.ROUND]
    survivors = {int(v) for v in info["survivors"]}  # type: ignore[union-attr]
    dropped = {int(v) for v in info["dropped"]}  # type: ignore[union-attr]
    answers = site.unmask(survivors, dropped)
    del context.state[wire.STATE]
    return Message(RecordDict({wire.SHARES: wire.by_node(answers)}), reply_to=msg)


def _save(context: Context, site: SiteSecAgg) -> None:
    context.state[wire.STATE] = ConfigRecord(site.state())  # type: ignore[arg-type]


def _load(context: Context, msg: Message) -> SiteSecAgg:
    """The round in progress at this node; refused unless the message is for it (the
    same node and round the server named when the round began)."""
    record = context.state.config_records.get(wire.STATE)
    if record is None:
        raise ValueError("no secure-aggregation round in progress at this node")
    site = SiteSecAgg.restore(dict(record))
    info = msg.content.config_records.get(wire.ROUND, ConfigRecord())
    if info.get("node") != site.node or info.get("round") != site.server_round:
        raise ValueError("the message is not for this node's secure-aggregation round")
    return site
