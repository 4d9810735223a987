"""The data storage API of Table 4 (paper §5.2-5.3, issue 14): its data model and rules, sans-IO.

* :mod:`appliance.apps.store.model`: data types, records keyed by (application, data id),
  versions, quotas, the replicated :class:`~appliance.apps.store.model.StoreState` with its
  canonical CBOR encoding, and the authorization rule each server runs before it contributes a
  decryption share of a stored secret (:mod:`appliance.crypto.tdh2`).

* :mod:`appliance.apps.store.service`: one server's store, sans-IO: the agreed writes applied in
  order, the state saved, the read protocol's messages and the rule before a share.
* :mod:`appliance.apps.store.node`: the trio glue inside ``pst serve`` (the writes' replicated
  sequence, the read protocol over the period channels, the key-holder's shares).
* :mod:`appliance.apps.store.client`: the client's side (seal a value, open the shares).
* :mod:`appliance.apps.store.commands`: ``pst store put|get|write|until|joint``.

What is built and what is not: docs/store.md.
"""
