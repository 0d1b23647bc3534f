"""channels/web_guard.py: address sets answer by network, and their memo stays bounded."""

from __future__ import annotations

from channels import web_guard
from channels.web_guard import Networks


def test_membership_by_network_for_both_families_and_junk() -> None:
    nets = Networks(["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"])
    for _ in range(2):  # the second pass answers from the memo: the same answers
        assert "10.1.2.3" in nets and "127.0.0.1" in nets and "fd00::1" in nets
        assert "11.0.0.1" not in nets and "127.0.0.2" not in nets and "fe80::1" not in nets
        assert "not an address" not in nets and "" not in nets and "10.0.0.1\r\n" not in nets
        assert 167837953 not in nets  # not text


def test_an_empty_set_holds_nothing() -> None:
    assert "127.0.0.1" not in Networks([])


def test_many_distinct_addresses_keep_the_memo_bounded_and_answers_right() -> None:
    nets = Networks(["10.0.0.0/16"])
    for i in range(web_guard._SEEN_MAX * 3):
        address = f"10.{i // 65536 % 2}.{i // 256 % 256}.{i % 256}"
        assert (address in nets) == address.startswith("10.0."), address
        assert nets._lookup.cache_info().currsize <= web_guard._SEEN_MAX
