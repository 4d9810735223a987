"""Byzantine agreement with quorum certificates, for the refresh and the initialization.

Modules (private; this package re-exports what others use):

* ``_messages``: the frozen messages, certificates, the committee and its quorum rule;
* ``_safety``: :class:`SafetyRules`, the only signer of votes, persisted before it signs;
* ``_engine``: :class:`Engine`, one single-shot agreement (leader, votes, timeouts, decision).

Safety holds whatever the message timing (n >= 3t+1, at most t Byzantine members);
progress needs the network to deliver messages within some unknown bound eventually.
"""

from appliance.protocols.agreement._engine import (
    ACCEPT,
    WAIT,
    Application,
    Decision,
    Engine,
    Validity,
    Verdict,
    reject,
)
from appliance.protocols.agreement._messages import (
    COMMIT,
    PREPARE,
    BadCertificate,
    Committee,
    Instance,
    QuorumCert,
    TimeoutCert,
    UncheckableCertificate,
    decode,
    digest,
    encode,
)
from appliance.protocols.agreement._safety import (
    MemoryStore,
    NotSafe,
    SafetyData,
    SafetyRules,
    SafetyStore,
    safety_from_bytes,
    safety_to_bytes,
)

__all__ = [
    "ACCEPT",
    "COMMIT",
    "PREPARE",
    "WAIT",
    "Application",
    "BadCertificate",
    "Committee",
    "Decision",
    "Engine",
    "Instance",
    "MemoryStore",
    "NotSafe",
    "QuorumCert",
    "SafetyData",
    "SafetyRules",
    "SafetyStore",
    "TimeoutCert",
    "UncheckableCertificate",
    "Validity",
    "Verdict",
    "decode",
    "digest",
    "encode",
    "reject",
    "safety_from_bytes",
    "safety_to_bytes",
]
