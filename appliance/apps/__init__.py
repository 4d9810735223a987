"""The appliance's applications: services built on the threshold group key.

* :mod:`appliance.apps.log`: the secure append-only log (issue 11), a transparency log in the
  C2SP formats whose checkpoints the group signs.
"""
