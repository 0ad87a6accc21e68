"""The outbound guard's address checks: every spelling, every range, the allow list, and refusals
that happen before any connection (the unit tier's sockets fail on connect)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.actions import StepError
from app.config import Config
from workers.actions import outbound
from workers.actions.outbound import Policy

PRODUCTION = Policy()
LOOPBACK_ALLOWED = Policy.from_config(Config(http_allow_networks=("127.0.0.0/8", "::1/128")))
EVERYTHING_ALLOWED = Policy.from_config(Config(http_allow_networks=("0.0.0.0/0", "::/0")))
HYPOTHESIS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "localhost",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "::1",
    "::ffff:127.0.0.1",
    "127.255.255.254",
]


def ip(text: str) -> outbound.IPAddress:
    return ipaddress.ip_address(text)


def expected_non_public(address: outbound.IPAddress) -> bool:
    """The rule, stated with the ipaddress module's own registries."""
    return (
        not address.is_global
        or address.is_private
        or address.is_loopback
        or address.is_unspecified
        or address.is_multicast
        or address.is_reserved
        or address.is_link_local
        or (address.version == 6 and address.is_site_local)
    )


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_spelling_of_loopback_resolves_to_loopback_and_is_refused_by_default(host):
    addresses = outbound.resolve(host, 80)
    assert addresses and all(a.is_loopback or (a.version == 6 and a.ipv4_mapped) for a in addresses)
    assert not any(PRODUCTION.permits(a) for a in addresses)
    assert all(LOOPBACK_ALLOWED.permits(a) for a in addresses)


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",
        "100.127.255.254",
        "0.0.0.0",
        "::",
        "fc00::1",
        "fd12:3456::1",
        "224.0.0.1",
        "ff02::1",
        "240.0.0.1",
        "255.255.255.255",
        "::ffff:10.0.0.1",
        "::ffff:0.0.0.0",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "2002:7f00:1::1",
        "fec0::1",
    ],
)
def test_non_public_addresses_are_refused_unless_allowed(text):
    address = ip(text)
    assert not PRODUCTION.permits(address)
    assert not LOOPBACK_ALLOWED.permits(address) or any(f.is_loopback for f in outbound.forms(address))
    assert EVERYTHING_ALLOWED.permits(address)


@pytest.mark.parametrize(
    "text",
    [
        "169.254.169.254",
        "169.254.0.1",
        "fe80::1",
        "fd00:ec2::254",
        "100.100.100.200",
        "168.63.129.16",
        "::ffff:169.254.169.254",
        "::169.254.169.254",
        "64:ff9b::a9fe:a9fe",
    ],
)
def test_link_local_and_metadata_are_refused_even_when_everything_is_allowed(text):
    assert outbound.always_refused(ip(text))
    assert not EVERYTHING_ALLOWED.permits(ip(text))


@pytest.mark.parametrize("text", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_permitted_by_default(text):
    assert PRODUCTION.permits(ip(text))


def test_an_allowed_cidr_admits_only_itself():
    policy = Policy.from_config(Config(http_allow_networks=("127.0.0.2/32",)))
    assert policy.permits(ip("127.0.0.2"))
    assert policy.permits(ip("::ffff:127.0.0.2")), "the mapped form reaches the same address"
    assert not policy.permits(ip("127.0.0.1"))
    assert not policy.permits(ip("::1"))
    assert not policy.permits(ip("10.0.0.2"))


def test_a_bad_cidr_is_a_configuration_error():
    with pytest.raises(ValueError, match="BATON_HTTP_ALLOW_NETWORKS"):
        Config.from_env({"BATON_HTTP_ALLOW_NETWORKS": "127.0.0.0/8,not-a-network"})
    config = Config.from_env(
        {"BATON_HTTP_ALLOW_NETWORKS": " 10.0.0.0/8 , ::1/128 ", "BATON_HTTP_MAX_RESPONSE_BYTES": "5"}
    )
    assert config.http_allow_networks == ("10.0.0.0/8", "::1/128")
    assert config.http_max_response_bytes == 5
    assert Config.from_env({}).http_allow_networks == ()
    assert Config.from_env({}).http_max_response_bytes == 1048576


@HYPOTHESIS
@given(st.ip_addresses(v=4))
def test_ipv4_addresses_are_classified_by_the_ipaddress_rules(address):
    link_local = address.is_link_local or any(address in n for n in outbound.ALWAYS_REFUSED)
    assert outbound.always_refused(address) == link_local
    assert PRODUCTION.permits(address) == (not link_local and not expected_non_public(address))
    assert EVERYTHING_ALLOWED.permits(address) == (not link_local)
    # The mapped IPv6 spelling of an address is judged exactly like the address.
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert PRODUCTION.permits(mapped) == PRODUCTION.permits(address)
    assert LOOPBACK_ALLOWED.permits(mapped) == LOOPBACK_ALLOWED.permits(address)


@HYPOTHESIS
@given(st.ip_addresses(v=6))
def test_ipv6_addresses_are_classified_by_the_ipaddress_rules(address):
    forms = outbound.forms(address)
    assert all(isinstance(f, (ipaddress.IPv4Address, ipaddress.IPv6Address)) for f in forms)
    refused_always = any(f.is_link_local or any(f in n for n in outbound.ALWAYS_REFUSED) for f in forms)
    assert outbound.always_refused(address) == refused_always
    assert PRODUCTION.permits(address) == (
        not refused_always and not any(expected_non_public(f) for f in forms)
    )
    if address.ipv4_mapped is None and forms == [address]:
        assert PRODUCTION.permits(address) == (not refused_always and not expected_non_public(address))


@HYPOTHESIS
@given(st.ip_addresses(v=4, network="127.0.0.0/8") | st.just(ipaddress.IPv6Address("::1")))
def test_every_loopback_address_is_refused_by_default_and_admitted_by_the_loopback_allow_list(address):
    assert not PRODUCTION.permits(address)
    assert LOOPBACK_ALLOWED.permits(address)


@HYPOTHESIS
@given(st.ip_addresses(v=4), st.integers(min_value=8, max_value=32))
def test_allowed_cidrs_are_respected(address, prefix):
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    policy = Policy.from_config(Config(http_allow_networks=(str(network),)))
    if not outbound.always_refused(address):
        assert policy.permits(address), f"{address} is inside the allowed {network}"
    outside = ipaddress.IPv4Address((int(network.broadcast_address) + 1) % 2**32)
    if outside not in network and expected_non_public(outside):
        assert not policy.permits(outside), f"{outside} is outside {network}"


@pytest.mark.parametrize(
    "url,host",
    [
        ("http://127.0.0.1:6379/", "127.0.0.1"),
        ("http://localhost:6379/", "localhost"),
        ("http://127.1/", "127.1"),
        ("http://2130706433/", "2130706433"),
        ("http://0x7f000001/", "0x7f000001"),
        ("http://0177.0.0.1/", "0177.0.0.1"),
        ("http://[::1]:6379/", "::1"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1"),
        ("https://10.1.2.3/", "10.1.2.3"),
        ("http://0:6379/", "0"),
        ("http://0.0.0.0:6379/", "0.0.0.0"),
        ("http://[::]:6379/", "::"),
        ("http://[::ffff:7f00:1]/", "::ffff:7f00:1"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    ],
)
def test_fetch_refuses_before_connecting(url, host):
    # The unit tier's sockets raise on connect: a StepError here proves no connection was tried.
    with pytest.raises(StepError) as raised:
        outbound.fetch("GET", url, PRODUCTION, 5.0)
    assert raised.value.code == "HTTP_DESTINATION_REFUSED" and raised.value.retriable is False
    assert repr(host) in raised.value.message
    assert "6379" not in raised.value.message and "connect" not in raised.value.message.lower()


@pytest.mark.parametrize("method", ["SET", "CONNECT", "TRACE", "PROPFIND", "GET\r\nX: y", ""])
def test_non_standard_methods_are_invalid_input(method):
    with pytest.raises(StepError) as raised:
        outbound.fetch(method, "http://127.0.0.1:6379/", LOOPBACK_ALLOWED, 5.0)
    assert raised.value.code == "INVALID_INPUT" and raised.value.retriable is False


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/", "file:///etc/passwd", "gopher://127.0.0.1:6379/_SET", "127.0.0.1"]
)
def test_only_http_and_https_urls(url):
    with pytest.raises(StepError) as raised:
        outbound.fetch("GET", url, EVERYTHING_ALLOWED, 5.0)
    assert raised.value.code == "INVALID_INPUT"
