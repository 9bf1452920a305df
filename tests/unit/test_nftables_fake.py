"""The fake `nft` refuses what the kernel refuses, all or nothing.

The same cases run against the real `nft` in tests/kernel/test_nftables_kernel.py.
"""

from __future__ import annotations

import pytest

from tests.fakes.nft_cases import ACCEPTED, FIRST, REFUSED, SETUP
from tests.fakes.nft_fake import FakeNft

NFT = ["nft", "-f", "-"]


@pytest.fixture
def fake() -> FakeNft:
    made = FakeNft()
    assert made.run(NFT, stdin=SETUP).ok
    return made


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_scripts_apply_nothing_and_name_the_line(fake: FakeNft, case: str) -> None:
    before = fake.ruleset()
    result = fake.run(NFT, stdin=FIRST + REFUSED[case])
    assert not result.ok
    assert result.stderr.startswith("/dev/stdin:2:"), result.stderr
    assert fake.ruleset() == before


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_accepted_scripts(fake: FakeNft, case: str) -> None:
    result = fake.run(NFT, stdin=ACCEPTED[case])
    assert result.ok, result.stderr


def test_check_mode_applies_nothing(fake: FakeNft) -> None:
    before = fake.ruleset()
    assert fake.run(["nft", "-c", "-f", "-"], stdin=FIRST).ok
    assert fake.ruleset() == before
    assert fake.run(NFT, stdin=FIRST).ok
    assert fake.ruleset() != before
