"""One secure-aggregation round as a site's and the server's state machines.

The round's sampled sites S exchange four messages with the server (SecAgg+, Bell et al.
2020; with `neighbours` 0 every site is every other's neighbour: SecAgg, Bonawitz et al.
2017):

1. advertise: each site sends two X25519 public keys, c (share encryption) and s (masks).
2. share: the server sends each site the keys of its holders (its neighbours and itself).
   The site draws a self-mask seed b, Shamir-shares b and its mask key s_sk among its
   holders (any `threshold` recover them), seals each holder's pair of shares for that
   holder only (ChaCha20-Poly1305 under the c-agreement key, bound to sender, receiver
   and round), and sends the ciphertexts, a SHA-256 digest of each share and one of b
   (its commitment: the b rebuilt from the shares must hash to it).
3. masked input: the server routes the ciphertexts; each site sends
   y = x + PRG(b) + sum over neighbours v of (+PRG(s_uv) if v > u else -PRG(s_uv)),
   all mod 2^64. The pairwise masks cancel in the sum of the sites that answer.
4. unmask: the server names the survivors (sent y) and the dropped (shared, no y). Each
   site opens the shares it holds and returns b's share of every survivor and s_sk's
   share of every dropped site, never both for one site. The server checks each share
   against its digest (a lying holder's shares are left out), rebuilds b of every
   survivor and s_sk of every dropped site from `threshold` shares, checks each against
   what the site committed to (b's digest, s's public key), and removes their masks:
   what is left is the sum of the survivors' x, and nothing about any one of them.

Fewer than `threshold` answers for any secret is `SecAggFailure`: the round fails under
the participation rules. Shares that pass their digests but do not rebuild the secret
the site committed to can only come from the site that dealt them: `HostileSite` names
it, so the round loop can leave it out of later attempts and rounds. The server is
trusted to send every site the same survivor list (an honest-but-curious server;
README's security model says so).
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedml.secagg import crypto

MIN_THRESHOLD = 2
SHARE_PURPOSE = b"fedml secagg share key"
MASK_PURPOSE = b"fedml secagg pairwise mask"

PublicKeys = tuple[bytes, bytes]  # (c: share encryption, s: pairwise masks)


class SecAggFailure(RuntimeError):
    """The round cannot be unmasked (too few sites answered, or shares were bad)."""


class HostileSite(SecAggFailure):
    """A site provably broke the protocol: the shares it dealt (each matching the digest
    it sent) do not rebuild the secret it committed to. No honest site can cause this."""

    def __init__(self, site: int, why: str) -> None:
        super().__init__(f"site {site} {why}")
        self.site = site


@dataclass(frozen=True)
class RoundPlan:
    """What every party of a round agrees on once keys are advertised: the sites taking
    part (those that advertised), the SecAgg+ graph over them and the threshold."""

    server_round: int
    sampled: tuple[int, ...]
    threshold: int
    neighbours: int  # graph degree; 0: complete graph

    def holders(self, node: int) -> tuple[int, ...]:
        """The sites that hold `node`'s shares: its neighbours and itself, sorted."""
        return tuple(sorted({node, *self.neighbours_of(node)}))

    def neighbours_of(self, node: int) -> tuple[int, ...]:
        """SecAgg+'s graph: the sites on a ring in an order the round fixes, each joined
        to `neighbours` // 2 sites on either side (a Harary graph); symmetric, so the
        pairwise masks cancel."""
        others = [v for v in self.sampled if v != node]
        if self.neighbours == 0 or self.neighbours >= len(self.sampled) - 1:
            return tuple(others)
        ring = sorted(self.sampled)
        random.Random(f"fedml secagg graph {self.server_round}").shuffle(ring)
        at, half = ring.index(node), max(1, self.neighbours // 2)
        near = {ring[(at + step) % len(ring)] for step in range(-half, half + 1) if step}
        return tuple(sorted(near))

    def check(self) -> None:
        """`SecAggFailure` when the protocol cannot run: too few sites took part for the
        threshold (every site's shares need `threshold` holders), or a threshold below 2
        (one answer would then unmask a single input)."""
        if len(set(self.sampled)) != len(self.sampled):
            raise ValueError("sampled sites repeat")
        if self.threshold < MIN_THRESHOLD:
            raise SecAggFailure(f"threshold {self.threshold} is below {MIN_THRESHOLD}")
        smallest = min((len(self.holders(v)) for v in self.sampled), default=0)
        if self.threshold > smallest:
            raise SecAggFailure(
                f"{len(self.sampled)} site(s) advertised keys: too few for threshold "
                f"{self.threshold} (the fewest holders of a site's shares: {smallest})"
            )


def associated(server_round: int, sender: int, receiver: int) -> bytes:
    """What a share ciphertext is bound to."""
    return struct.pack("<QQQ", server_round, sender, receiver)


def digest(share: bytes) -> bytes:
    return hashlib.sha256(share).digest()


def _public_key_or_none(private: bytes) -> bytes | None:
    """The X25519 public key of `private`, None when it is no private key at all."""
    try:
        return crypto.public_key(private)
    except ValueError:
        return None


def _pack(first: bytes, second: bytes) -> bytes:
    return struct.pack("<I", len(first)) + first + second


def _unpack(data: bytes) -> tuple[bytes, bytes]:
    (size,) = struct.unpack_from("<I", data)
    return data[4 : 4 + size], data[4 + size :]


class SiteSecAgg:
    """A site's side of one round. `secret`: 96 bytes that make its two private keys
    and its self-mask seed (simulation: derived from the run seed, so a run replays); a
    deployed site passes None and draws them from OS entropy."""

    def __init__(self, node: int, server_round: int, secret: bytes | None = None) -> None:
        secret = secret if secret is not None else os.urandom(96)
        if len(secret) != 96:
            raise ValueError("secret must be 96 bytes")
        self.node = node
        self.server_round = server_round
        self.c_private = crypto.private_key(secret[:32])
        self.s_private = crypto.private_key(secret[32:64])
        self.self_seed = secret[64:]
        self.plan: RoundPlan | None = None  # known from the share step on
        self.keys: dict[int, PublicKeys] = {}  # its holders' public keys
        self.own: tuple[bytes, bytes] = (b"", b"")  # its shares of its own secrets
        self.received: dict[int, bytes] = {}  # sender -> sealed shares for this site
        self.has_masked = False  # a site masks once per round: twice would reveal x1 - x2

    # -- state between messages (a deployed site's task process ends after each) -------
    def state(self) -> dict[str, bytes | int | list[int]]:
        """Everything this site keeps between the round's messages, as plain values."""
        plan = self.plan
        return {
            "node": self.node,
            "round": self.server_round,
            "secret": self.c_private + self.s_private + self.self_seed,
            "sampled": list(plan.sampled) if plan else [],
            "threshold": plan.threshold if plan else 0,
            "neighbours": plan.neighbours if plan else 0,
            "key-nodes": sorted(self.keys),
            "keys": b"".join(c + s for _, (c, s) in sorted(self.keys.items())),
            "own": _pack(*self.own),
            "received-nodes": sorted(self.received),
            "received": b"".join(_pack(self.received[v], b"") for v in sorted(self.received)),
            "masked": int(self.has_masked),
        }

    @classmethod
    def restore(cls, state: dict[str, Any]) -> SiteSecAgg:
        """The site of `state()`."""
        site = cls(int(state["node"]), int(state["round"]), bytes(state["secret"]))
        sampled = tuple(int(v) for v in state["sampled"])
        if sampled:
            site.plan = RoundPlan(
                site.server_round, sampled, int(state["threshold"]), int(state["neighbours"])
            )
        keys = bytes(state["keys"])
        site.keys = {
            int(v): (keys[64 * i : 64 * i + 32], keys[64 * i + 32 : 64 * i + 64])
            for i, v in enumerate(state["key-nodes"])
        }
        site.own = _unpack(bytes(state["own"]))
        received, data = {}, bytes(state["received"])
        for v in state["received-nodes"]:
            sealed, data = _unpack(data)
            received[int(v)] = sealed
        site.received = received
        site.has_masked = bool(state["masked"])
        return site

    # -- 1. advertise ------------------------------------------------------------------
    def advertise(self) -> PublicKeys:
        return crypto.public_key(self.c_private), crypto.public_key(self.s_private)

    # -- 2. share ----------------------------------------------------------------------
    def share(
        self, plan: RoundPlan, keys: dict[int, PublicKeys]
    ) -> tuple[dict[int, bytes], dict[int, bytes], bytes]:
        """Seal this site's shares for each holder; returns (ciphertexts, digests), both
        by holder, and its commitment to its self-mask seed (the seed's digest). `keys`
        must be exactly its holders' keys under `plan`, its own unchanged."""
        plan.check()
        holders = plan.holders(self.node)
        if (
            self.plan is not None  # shared already this round
            or plan.server_round != self.server_round
            or tuple(sorted(keys)) != holders
            or keys[self.node] != self.advertise()
        ):
            raise SecAggFailure(f"site {self.node}: the server sent the wrong holders' keys")
        self.plan, self.keys = plan, dict(keys)
        seed_shares = crypto.split_secret(self.self_seed, plan.threshold, len(holders))
        key_shares = crypto.split_secret(self.s_private, plan.threshold, len(holders))
        sealed, digests = {}, {}
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
            digests[holder] = digest(seed_share) + digest(key_share)
            if holder == self.node:
                self.own = (seed_share, key_share)
                continue
            key = crypto.agree(self.c_private, keys[holder][0], SHARE_PURPOSE)
            ad = associated(plan.server_round, self.node, holder)
            sealed[holder] = crypto.seal(key, _pack(seed_share, key_share), ad)
        return sealed, digests, digest(self.self_seed)

    # -- 3. masked input ---------------------------------------------------------------
    def masked(
        self, vector: np.ndarray, received: dict[int, bytes], context: bytes = b""
    ) -> np.ndarray:
        """`vector` (uint64) under this site's masks: its self-mask and one pairwise
        mask with each neighbour that shared (whose ciphertext is in `received`, sender
        -> sealed shares for this site); keeps `received` for the unmask step. Once per
        round (twice would reveal the difference of two inputs), and only when at least
        `threshold` - 1 neighbours shared (fewer pairwise masks would not hide it).
        `context` (what the input's encoding depends on, e.g. fixed-point units the
        server chose) enters every pairwise mask: sites that were told different things
        mask with masks that do not cancel, so their sum reveals nothing."""
        if self.plan is None or self.has_masked:
            raise SecAggFailure(f"site {self.node}: not in the masking step (masked already?)")
        neighbours = set(self.plan.neighbours_of(self.node))
        received = {v: sealed for v, sealed in received.items() if v in neighbours}
        if len(received) + 1 < self.plan.threshold:
            # too few neighbours shared: their masks would not hide this site's input
            raise SecAggFailure(
                f"site {self.node}: {len(received)} neighbour(s) shared, "
                f"{self.plan.threshold - 1} needed to mask"
            )
        self.received, self.has_masked = received, True
        y = vector.astype(np.uint64) + crypto.mask(self.self_seed, vector.size)
        for v in self.plan.neighbours_of(self.node):
            if v not in received:
                continue  # v did not share: the server cannot remove a mask with v
            pairwise = crypto.mask(self._pair_seed(v, context), vector.size)
            y = y + pairwise if v > self.node else y - pairwise  # uint64: mod 2^64
        return y

    def _pair_seed(self, other: int, context: bytes) -> bytes:
        return crypto.agree(self.s_private, self.keys[other][1], MASK_PURPOSE + context)

    # -- 4. unmask ---------------------------------------------------------------------
    def unmask(self, survivors: set[int], dropped: set[int]) -> dict[int, bytes]:
        """The shares the server asks for: b's of each survivor, s_sk's of each dropped
        site, among the sites whose shares this site holds. Refuses a request that could
        reveal a single input: before this site masked, without this site among the
        survivors, naming a site outside the round or in both lists, or with fewer
        survivors than the threshold. A ciphertext that does not open is left out: the
        server then needs another holder's share."""
        plan = self.plan
        if (
            plan is None
            or not self.has_masked
            or self.node not in survivors
            or survivors & dropped
            or not (survivors | dropped) <= set(plan.sampled)
            or len(survivors) < plan.threshold
        ):
            raise SecAggFailure(f"site {self.node}: refusing an unsafe unmask request")
        answers = {}
        for sender in sorted((survivors | dropped) & set(self.plan.holders(self.node))):
            if sender == self.node:
                pair = self.own
            elif sender in self.received:
                key = crypto.agree(self.c_private, self.keys[sender][0], SHARE_PURPOSE)
                ad = associated(self.plan.server_round, sender, self.node)
                try:
                    pair = _unpack(crypto.unseal(key, self.received[sender], ad))
                except crypto.ShareTampered:
                    continue
            else:
                continue
            answers[sender] = pair[0] if sender in survivors else pair[1]
        return answers


class ServerSecAgg:
    """The server's side of one round: routes keys and ciphertexts, sums masked inputs
    as they stream in, and unmasks the sum. It never holds a single unmasked input."""

    def __init__(self, server_round: int, threshold: int, neighbours: int) -> None:
        self.server_round = server_round
        self.threshold = threshold
        self.neighbours = neighbours
        self.plan: RoundPlan | None = None
        self.keys: dict[int, PublicKeys] = {}
        self.digests: dict[int, dict[int, bytes]] = {}  # sender -> holder -> digests
        self.commitments: dict[int, bytes] = {}  # sender -> digest of its self-mask seed
        self.survivors: set[int] = set()
        self.total: np.ndarray | None = None

    # -- 1 -> 2 ------------------------------------------------------------------------
    def holder_keys(
        self, advertised: dict[int, PublicKeys]
    ) -> tuple[RoundPlan, dict[int, dict[int, PublicKeys]]]:
        """The round's plan over the sites that advertised, and what each of them
        receives: its holders' keys. `SecAggFailure` when too few advertised."""
        plan = RoundPlan(
            self.server_round, tuple(sorted(advertised)), self.threshold, self.neighbours
        )
        plan.check()
        self.plan, self.keys = plan, dict(advertised)
        return plan, {v: {h: self.keys[h] for h in plan.holders(v)} for v in plan.sampled}

    # -- 2 -> 3 ------------------------------------------------------------------------
    def route(
        self, shared: dict[int, tuple[dict[int, bytes], dict[int, bytes], bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """The ciphertexts each holder receives (sender -> sealed), from what each site
        shared; keeps the digests and commitments to check the unmask answers."""
        inbox: dict[int, dict[int, bytes]] = {}
        for sender, (sealed, digests, commitment) in shared.items():
            self.digests[sender] = dict(digests)
            self.commitments[sender] = commitment
            for holder, ciphertext in sealed.items():
                inbox.setdefault(holder, {})[sender] = ciphertext
        return inbox

    # -- 3 -----------------------------------------------------------------------------
    def add(self, node: int, masked: np.ndarray) -> None:
        """Fold one site's masked input into the running sum (mod 2^64)."""
        if node not in self.digests or node in self.survivors:
            raise SecAggFailure(f"site {node} sent an input it may not send")
        masked = np.asarray(masked, dtype=np.uint64)
        self.total = masked.copy() if self.total is None else self.total + masked
        self.survivors.add(node)

    @property
    def dropped(self) -> set[int]:
        """Sites that shared their secrets but sent no masked input."""
        return set(self.digests) - self.survivors

    # -- 4 -----------------------------------------------------------------------------
    def unmask(self, answers: dict[int, dict[int, bytes]], context: bytes = b"") -> np.ndarray:
        """The sum of the survivors' inputs, from the sites' unmask `answers`
        (responder -> {site: share}); `context` as the sites masked with."""
        if self.plan is None or self.total is None or len(self.survivors) < self.threshold:
            raise SecAggFailure(
                f"{len(self.survivors)} site(s) sent masked input, {self.threshold} needed"
            )
        total = self.total.copy()
        for u in sorted(self.survivors):
            total -= crypto.mask(self._recover(u, answers, kind=0), total.size)
        for d in sorted(self.dropped):
            s_private = self._recover(d, answers, kind=1)
            for u in self.plan.neighbours_of(d):
                if u not in self.survivors:
                    continue
                seed = crypto.agree(s_private, self.keys[u][1], MASK_PURPOSE + context)
                pairwise = crypto.mask(seed, total.size)
                # u added +PRG(s_ud) when d > u, -PRG(s_ud) when d < u
                total = total - pairwise if d > u else total + pairwise
        return total

    def _recover(self, site: int, answers: dict[int, dict[int, bytes]], kind: int) -> bytes:
        """A site's self-mask seed (kind 0) or mask key (kind 1) from the shares whose
        digests match what the site committed to; lying answers are left out. Valid
        shares that rebuild no secret, or another than the site committed to (the seed's
        digest, the mask key's public key), were dealt so by the site: `HostileSite`."""
        committed = self.digests[site]
        shares = [
            answer[site]
            for responder, answer in sorted(answers.items())
            if site in answer
            and responder in committed
            and digest(answer[site]) == committed[responder][32 * kind : 32 * kind + 32]
        ]
        if len(shares) < self.threshold:
            raise SecAggFailure(
                f"site {site}: {len(shares)} valid share(s), {self.threshold} needed"
            )
        what = "self-mask seed" if kind == 0 else "mask key"
        try:
            secret = crypto.join_shares(shares[: self.threshold])
        except Exception as exc:  # shares of no single polynomial: Flower's combine raises
            raise HostileSite(site, f"dealt shares of its {what} that do not combine") from exc
        committed = (
            digest(secret) == self.commitments.get(site)
            if kind == 0
            else _public_key_or_none(secret) == self.keys[site][1]
        )
        if not committed:
            raise HostileSite(site, f"dealt shares of another {what} than it committed to")
        return secret
