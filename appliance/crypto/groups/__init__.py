"""Prime-order groups behind one interface.

Three instances: Ed25519 (libsodium through pynacl), a FIPS 186-4 DSA subgroup
(gmpy2) and P-256 (gmpy2). Scalars are Python ints modulo ``order``; elements are
opaque values of the instance's own type, compared with ``==``.
"""

from appliance.crypto.groups._base import Group

__all__ = ["Group"]
