"""The data storage API of Table 4 (paper §5.2-5.3, issue 14): its data model and rules, sans-IO.

* :mod:`appliance.apps.store.model`: data types, records keyed by (application, data id),
  versions, quotas, the replicated :class:`~appliance.apps.store.model.StoreState` with its
  canonical CBOR encoding, and the authorization rule each server runs before it contributes a
  decryption share of a stored secret (:mod:`appliance.crypto.tdh2`).

Not wired to the network yet: see docs/store.md.
"""
