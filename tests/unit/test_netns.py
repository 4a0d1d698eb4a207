"""The network harness's checks that need no namespace (benchmarks/netns.py)."""

from __future__ import annotations

import pytest

from benchmarks import netns


@pytest.mark.parametrize(
    ("rate", "bits"),
    [("100mbit", 100_000_000), ("1gbit", 10**9), ("500kbit", 500_000), ("2.5Mbit", 2_500_000)],
)
def test_rate_bits(rate, bits):
    assert netns.rate_bits(rate) == bits


@pytest.mark.parametrize("rate", ["", "fast", "0mbit", "-1mbit", "100mbps", "10 tbit"])
def test_bad_rates_refused(rate):
    with pytest.raises(ValueError, match="rate must look like"):
        netns.rate_bits(rate)


def test_bad_networks_refused_before_anything_is_created():
    with pytest.raises(ValueError, match="distinct host names"):
        netns.Network(["a", "a"])
    with pytest.raises(ValueError, match="distinct host names"):
        netns.Network(0)
    with pytest.raises(ValueError, match="rate must look like"):
        netns.Network(2, rate="fast")


def test_skip_reason_without_root(monkeypatch):
    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "need root" in netns.unavailable_reason()


def test_skip_reason_without_iproute2(monkeypatch):
    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else "/bin/ip")
    assert netns.unavailable_reason() == "`tc` (iproute2) is not installed"


def test_skip_reason_when_namespaces_cannot_be_made(monkeypatch):
    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: "/bin/" + tool)

    def refuse(*argv):
        raise RuntimeError("ip netns add x: Operation not permitted")

    monkeypatch.setattr(netns, "_run", refuse)
    reason = netns.unavailable_reason()
    assert reason.startswith("cannot create a network namespace") and "not permitted" in reason


def test_every_address_is_in_the_benchmarking_range():
    assert netns.SUBNET.subnet_of(netns.BENCH_NET)
    assert str(netns.BENCH_NET) == "198.18.0.0/15"
