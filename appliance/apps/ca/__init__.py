"""The network's certificate authority: X.509 certificates signed by the threshold key ``ca``.

* :mod:`appliance.apps.ca.x509`: the group root certificate (a deterministic function of the
  ``ca`` public key and C, so every server rebuilds it byte for byte) and the leaves it issues,
  built with cryptography and signed in two passes around the network's threshold signature.
* :mod:`appliance.apps.ca.policy`: the ``sign/ca`` payload check every signer runs before its
  share: the root's exact TBSCertificate, or a leaf its policy profiles allow; anything else is
  refused with a ``certificate-outside-policy`` alert naming the server that asked.

Both are pure (no trio, no network). docs/ca.md has the design and what is not done yet.
"""
