"""The operator's documentation keeps up with the code."""

from __future__ import annotations

from pathlib import Path

from appliance.protocols._core import AlertKind

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_deployment_guide_explains_every_alert_kind() -> None:
    guide = (DOCS / "deploy.md").read_text()
    section = guide[guide.index("## 7. Alerts") : guide.index("## 8.")]
    rows = {line.split("|")[1].strip().strip("`") for line in section.splitlines() if line.startswith("| `")}
    assert rows == {kind.value for kind in AlertKind}
