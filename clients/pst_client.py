"""Client of a PServer's local API (the library lives in ``appliance.api.client``).

    python clients/pst_client.py --socket /run/pst/api.sock sign FILE

Applications import ``from appliance.api.client import PstClient, PstError``.
"""

from __future__ import annotations

import sys

from appliance.api.client import PstClient, PstError, main

__all__ = ["PstClient", "PstError", "main"]

if __name__ == "__main__":
    sys.exit(main())
