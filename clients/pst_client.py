"""Client of a PServer's local API, on a machine where the appliance is installed.

    python clients/pst_client.py --socket /run/pst/api.sock sign FILE
    python clients/pst_client.py --name APP --password-file PW request FILE   # distributed (§5.1)
    python clients/pst_client.py --name APP --password-file PW approve --all

The library lives in ``appliance.api.client``. Machines that run applications but no server
install ``clients/python`` instead (distribution ``pst-client``: cbor2 and the standard library
only), which has the same API. docs/api.md describes both.
"""

from __future__ import annotations

import sys

from appliance.api.client import (
    PendingRequest,
    PstClient,
    PstError,
    RegistrationInfo,
    main,
    sha512_of,
    sign_file,
    verify,
    verify_distributed,
)

__all__ = [
    "PendingRequest",
    "PstClient",
    "PstError",
    "RegistrationInfo",
    "main",
    "sha512_of",
    "sign_file",
    "verify",
    "verify_distributed",
]

if __name__ == "__main__":
    sys.exit(main())
