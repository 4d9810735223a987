"""Client of a PServer's local API (the library lives in ``appliance.api.client``).

    python clients/pst_client.py --socket /run/pst/api.sock sign FILE
    python clients/pst_client.py --name APP --password-file PW request FILE   # distributed (§5.1)
    python clients/pst_client.py --name APP --password-file PW approve --all

Applications import ``from appliance.api.client import PstClient, PstError``.
"""

from __future__ import annotations

import sys

from appliance.api.client import PendingRequest, PstClient, PstError, main, verify_distributed

__all__ = ["PendingRequest", "PstClient", "PstError", "main", "verify_distributed"]

if __name__ == "__main__":
    sys.exit(main())
