"""Prime-order groups behind one interface.

Three instances: Ed25519 (libsodium through pynacl), a FIPS 186-4 DSA subgroup
(gmpy2) and P-256 (gmpy2). Scalars are Python ints modulo ``order``; elements are
opaque values of the instance's own type, compared with ``==``.
"""

from appliance.crypto.groups._base import Group
from appliance.crypto.groups.dsa import DSA2048, DSADomainParameters, DSAGroup
from appliance.crypto.groups.ed25519 import ED25519, Ed25519Group
from appliance.crypto.groups.p256 import P256, P256Group, P256Point

__all__ = [
    "DSA2048",
    "ED25519",
    "P256",
    "DSADomainParameters",
    "DSAGroup",
    "Ed25519Group",
    "Group",
    "P256Group",
    "P256Point",
]
