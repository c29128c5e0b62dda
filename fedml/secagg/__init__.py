"""Secure aggregation (SecAgg+, Bell et al. 2020; SecAgg, Bonawitz et al. 2017 when every
site is every other's neighbour): the server learns the sum of the sites' updates and
nothing about any single one.

The pieces, each usable and tested on its own:

- `crypto`: X25519 key agreement, HKDF, ChaCha20-Poly1305 for the share ciphertexts,
  ChaCha20 keystreams for masks (all from `cryptography`), and Shamir sharing (Flower's,
  on pycryptodome);
- `encoding`: a model update and its example count as one integer vector in the ring
  Z_(2^64), so that the sum of the vectors is the example-weighted sum of the updates;
- `protocol`: the four exchanges of one round, as a site's and the server's state
  machines over plain values (advertise keys, share, masked input, unmask). The round
  loop carries them in messages.
"""
