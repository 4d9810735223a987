"""The appliance's applications: services built on the threshold group key.

* :mod:`appliance.apps.log`: the secure append-only log (issue 11), a transparency log in the
  C2SP formats whose checkpoints the group signs.
* :mod:`appliance.apps.store`: the data storage API of Table 4 (issue 14): stored data, and
  secrets as TDH2 ciphertexts under the network's store key (data model and rules so far).
"""
