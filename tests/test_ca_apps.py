"""Application profiles of the group's CA (issue 13 §1): each application's leaf names its
application (subjectAltName URI ``urn:pst:app:NAME``) and every signer checks, from the TBS
alone, that its names are the ones ``[ca.apps.NAME]`` allows for that application."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ca import GRACE, NOW, ROOT_PUBLIC, WITH_CA, C, _node_config

from appliance.apps.ca import x509 as ca
from appliance.apps.ca.policy import (
    CaPolicy,
    CertificateCheck,
    PolicyError,
    app_profile,
    check_pattern,
    decode_tbs,
    name_allowed,
    server_tls_profile,
)

KEY = ec.generate_private_key(ec.SECP256R1()).public_key()
POLICY = CaPolicy(
    GRACE,
    (
        server_tls_profile(C, ["pst.example.org"]),
        app_profile("web-tunnel", ["tunnel.example.org", "*.vpn.example.org"]),
        app_profile("db", ["db.example.org"]),
    ),
)


def check() -> CertificateCheck:
    return CertificateCheck(C, lambda: ROOT_PUBLIC, POLICY, clock=lambda: NOW)


def tbs(names: list[str], app: str | None) -> bytes:
    builder = ca.leaf_builder(
        root_public=ROOT_PUBLIC,
        constants=C,
        subject_key=KEY,
        names=names,
        eku=ca.TLS_EKU,
        eku_critical=False,
        validity=ca.leaf_validity(C, NOW, GRACE),
        app=app,
    )
    return ca.tbs_of(builder, ROOT_PUBLIC)


def test_an_application_leaf_carries_its_application_and_fits_its_profile_only() -> None:
    message = tbs(["tunnel.example.org", "a.vpn.example.org", "*.vpn.example.org"], "web-tunnel")
    leaf = decode_tbs(message)
    assert leaf.app == "web-tunnel"
    assert leaf.names == ("tunnel.example.org", "a.vpn.example.org", "*.vpn.example.org")
    assert check().check(message) is None
    assert check().check(tbs(["db.example.org"], "db")) is None
    # Another application's names: refused, naming the application's profile.
    why = check().check(tbs(["db.example.org"], "web-tunnel"))
    assert why == "no profile allows it: names ['db.example.org'] are not allowed by profile 'app:web-tunnel'"
    # The servers' names are not the application's, and an application's are not the servers'.
    why = check().check(tbs(["pst.example.org"], "web-tunnel"))
    assert why is not None and "not allowed by profile 'app:web-tunnel'" in why
    why = check().check(tbs(["tunnel.example.org"], None))
    assert why is not None and "not allowed by profile 'server-tls'" in why
    # An application without a profile gets nothing.
    assert check().check(tbs(["tunnel.example.org"], "mail")) == (
        "no profile for application 'mail' ([ca.apps] of this server)"
    )


@pytest.mark.parametrize(
    ("names", "allowed"),
    [
        (["a.vpn.example.org"], True),
        (["x-1.vpn.example.org"], True),
        (["*.vpn.example.org"], True),
        (["vpn.example.org"], False),  # the zone itself is not under the wildcard
        (["a.b.vpn.example.org"], False),  # one label only
        (["*.b.vpn.example.org"], False),
        (["w*.vpn.example.org"], False),  # no partial-label wildcards
        (["-a.vpn.example.org"], False),
        (["a.vpn.example.org.evil.com"], False),
        (["*.example.org"], False),
        (["evil.com"], False),
    ],
)
def test_the_wildcard_rule(names: list[str], allowed: bool) -> None:
    why = check().check(tbs(names, "web-tunnel"))
    assert (why is None) == allowed, why


def test_wildcards_of_the_servers_profile_stay_literal() -> None:
    policy = CaPolicy(GRACE, (server_tls_profile(C, ["*.example.org"]),))
    chk = CertificateCheck(C, lambda: ROOT_PUBLIC, policy, clock=lambda: NOW)
    assert chk.check(tbs(["*.example.org"], None)) is None
    assert chk.check(tbs(["a.example.org"], None)) is not None


def _san_leaf(san: list[x509.GeneralName]) -> bytes:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.root_subject(C))
        .public_key(KEY)
        .serial_number(9)
        .not_valid_before(ca._utc(ca.leaf_validity(C, NOW, GRACE)[0]))
        .not_valid_after(ca._utc(ca.leaf_validity(C, NOW, GRACE)[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
    )
    return ca.tbs_of(builder, ROOT_PUBLIC)


@pytest.mark.parametrize(
    ("san", "reason"),
    [
        (
            [x509.DNSName("db.example.org"), x509.UniformResourceIdentifier("https://db.example.org/")],
            "a URI that does not start with urn:pst:app:",
        ),
        (
            [
                x509.DNSName("db.example.org"),
                x509.UniformResourceIdentifier("urn:pst:app:db"),
                x509.UniformResourceIdentifier("urn:pst:app:web-tunnel"),
            ],
            "more than one URI",
        ),
        (
            [x509.DNSName("db.example.org"), x509.UniformResourceIdentifier("urn:pst:app:d b")],
            "is not an application name",
        ),
        ([x509.UniformResourceIdentifier("urn:pst:app:db")], "subjectAltName: no names"),
    ],
)
def test_application_uris_outside_the_rules_are_refused(san: list[x509.GeneralName], reason: str) -> None:
    why = check().check(_san_leaf(san))
    assert why is not None and reason in why, why


def test_an_empty_subject_application_leaf_is_signed() -> None:
    san = [x509.DNSName("db.example.org"), x509.UniformResourceIdentifier("urn:pst:app:db")]
    assert check().check(_san_leaf(san)) is None


@pytest.mark.parametrize(
    "pattern", ["*.org", "*", "a.*.example.org", "w*.example.org", "exa mple.org", "-a.example.org", ""]
)
def test_profile_patterns_outside_the_rule_are_refused(pattern: str) -> None:
    with pytest.raises(PolicyError):
        check_pattern(pattern)


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=st.lists(_LABEL, min_size=1, max_size=5), zone=st.lists(_LABEL, min_size=2, max_size=3))
def test_a_wildcard_allows_exactly_one_label_under_its_zone(labels: list[str], zone: list[str]) -> None:
    z = ".".join(zone)
    pattern = check_pattern(f"*.{z}")
    name = ".".join([*labels, z])
    assert name_allowed(name, frozenset({pattern})) == (len(labels) == 1)
    assert name_allowed(f"*.{z}", frozenset({pattern}))
    assert not name_allowed(z, frozenset({pattern}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(
        st.sampled_from(
            [
                "tunnel.example.org",
                "a.vpn.example.org",
                "db.example.org",
                "pst.example.org",
                "x.y.vpn.example.org",
            ]
        ),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    app=st.sampled_from(["web-tunnel", "db", "mail", None]),
)
def test_a_leaf_is_signed_exactly_when_its_application_allows_its_names(
    names: list[str], app: str | None
) -> None:
    allowed = {
        "web-tunnel": {"tunnel.example.org", "a.vpn.example.org"},
        "db": {"db.example.org"},
        "mail": set(),
        None: {"pst.example.org"},
    }[app]
    why = check().check(tbs(names, app))
    assert (why is None) == (set(names) <= allowed), why


def test_the_apps_sections_make_one_profile_per_application(tmp_path: Path) -> None:
    from appliance.host import config as node_config
    from appliance.node.ca import policy_of

    config = node_config.load(
        _node_config(
            tmp_path,
            WITH_CA,
            '[ca]\n[ca.apps.web-tunnel]\nnames = ["Tunnel.example.org", "*.vpn.example.org"]\n'
            '[ca.apps.db]\nnames = ["10.0.0.1"]\n',
        )
    )
    assert config.ca is not None
    assert config.ca.app_names("web-tunnel") == ("tunnel.example.org", "*.vpn.example.org")
    assert config.ca.app_names("nope") is None
    profiles = {p.name: p for p in policy_of(config).profiles}
    assert set(profiles) == {"server-tls", "app:db", "app:web-tunnel"}
    assert profiles["app:db"].app == "db" and profiles["app:db"].names == {"10.0.0.1"}
    assert config.ca.enroll == ()


def test_an_enrollment_ca_is_read_per_application(tmp_path: Path) -> None:
    from appliance.host import config as node_config

    (tmp_path / "enroll.pem").write_text("not checked here: pst serve loads it\n")
    config = node_config.load(
        _node_config(
            tmp_path,
            WITH_CA,
            '[ca]\n[ca.apps.web-tunnel]\nnames = ["tunnel.example.org"]\nenroll_ca = "enroll.pem"\n'
            '[ca.apps.db]\nnames = ["10.0.0.1"]\n',
        )
    )
    assert config.ca is not None
    assert config.ca.enroll == (("web-tunnel", config.path.parent / "enroll.pem"),)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[ca.apps.web-tunnel]\nnames = ["*.org"]\n', "ca.apps.web-tunnel.names: '*.org': a wildcard needs"),
        ("[ca.apps.web-tunnel]\nnames = []\n", "ca.apps.web-tunnel.names must be a non-empty list"),
        ('[ca.apps.web-tunnel]\nname = ["a.org"]\n', "must be a section with the keys names (and enroll_ca)"),
        ('[ca]\napps = "x"\n', "ca.apps must be a table"),
        ('[ca.apps."bad name"]\nnames = ["a.example.org"]\n', "is not an application name"),
        (
            '[ca.apps.web-tunnel]\nnames = ["a.example.org"]\nenroll_ca = "/nonexistent/ca.pem"\n',
            "ca.apps.web-tunnel.enroll_ca: no such file /nonexistent/ca.pem",
        ),
        ('[ca.apps.web-tunnel]\nnames = ["a.example.org"]\nenroll_ca = 3\n', "enroll_ca must be a file path"),
    ],
)
def test_bad_apps_sections_are_refused_with_the_key(tmp_path: Path, extra: str, message: str) -> None:
    from appliance.host import config as node_config
    from appliance.protocols.state import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        node_config.load(_node_config(tmp_path, WITH_CA, extra))


_APP_LEAF = tbs(["tunnel.example.org", "a.vpn.example.org"], "web-tunnel")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=len(_APP_LEAF) - 1), st.integers(min_value=1, max_value=255))
def test_fuzz_a_changed_byte_of_an_application_leaf(position: int, flip: int) -> None:
    data = bytearray(_APP_LEAF)
    data[position] ^= flip
    why = check().check(bytes(data))
    if why is None:  # still a leaf of an application whose profile allows every one of its names
        leaf = decode_tbs(bytes(data))
        profiles = {p.app: p for p in POLICY.profiles}
        assert leaf.app in profiles and not leaf.ca
        assert all(name_allowed(n, profiles[leaf.app].names) for n in leaf.names)
