"""The iptables fake refuses what the kernel refuses, and the tracer follows every branch.

The refusals below were each checked against iptables 1.8.9 (nft and legacy) in a
network namespace; the fake is only useful if a backend bug fails here as it would
on a node.
"""

from __future__ import annotations

import pytest

from tests.fakes.iptables_fake import IptablesFake
from tests.fakes.packet_flow import UnsupportedRuleError, trace

RESTORE = ("iptables-nft-restore", "-w", "5", "--noflush")


def restore(fake: IptablesFake, text: str, tool: str = "iptables-nft-restore") -> tuple[int, str]:
    result = fake.run([tool, "-w", "5", "--noflush"], stdin=text)
    return result.returncode, result.stderr


# -- restore: what is accepted ----------------------------------------------------------


def test_restore_creates_chains_and_rules_and_save_prints_them() -> None:
    fake = IptablesFake()
    code, err = restore(
        fake,
        "*nat\n:KPY-B - [0:0]\n:KPY-A - [0:0]\n"
        '-A KPY-A -d 198.18.0.1/32 -p tcp -m comment --comment "a b" -m tcp --dport 80 -j KPY-B\n'
        "-A KPY-B -p tcp -m tcp -j DNAT --to-destination 198.18.1.1:8080\n"
        "-A PREROUTING -j KPY-A\nCOMMIT\n",
    )
    assert (code, err) == (0, "")
    saved = fake.save_text(table="nat")
    assert ":KPY-A - [0:0]\n:KPY-B - [0:0]\n" in saved  # user chains sorted, like iptables-save
    assert (
        '-A KPY-A -d 198.18.0.1/32 -p tcp -m comment --comment "a b" -m tcp --dport 80 -j KPY-B'
        in saved
    )
    assert fake.rules("nat", "PREROUTING") == ["-A PREROUTING -j KPY-A"]


def test_noflush_declaration_flushes_a_user_chain_but_not_a_builtin() -> None:
    fake = IptablesFake()
    fake.seed("*nat\n:KPY-A - [0:0]\n-A KPY-A -j RETURN\n-A PREROUTING -j KPY-A\nCOMMIT\n")
    assert restore(fake, "*nat\n:PREROUTING ACCEPT [0:0]\n:KPY-A - [0:0]\nCOMMIT\n")[0] == 0
    assert fake.rules("nat", "KPY-A") == []
    assert fake.rules("nat", "PREROUTING") == ["-A PREROUTING -j KPY-A"]


def test_without_noflush_the_table_is_replaced() -> None:
    fake = IptablesFake()
    fake.seed("*nat\n:OTHER - [0:0]\nCOMMIT\n")
    result = fake.run(["iptables-nft-restore"], stdin="*nat\n:KPY-A - [0:0]\nCOMMIT\n")
    assert result.ok
    assert "OTHER" not in fake.chains("nat")


def test_delete_of_a_chain_flushed_and_unreferenced_in_the_same_batch_is_accepted() -> None:
    fake = IptablesFake()
    fake.seed(
        "*nat\n:KPY-A - [0:0]\n:KPY-B - [0:0]\n-A KPY-A -j KPY-B\n-A KPY-B -j RETURN\nCOMMIT\n"
    )
    code, _ = restore(fake, "*nat\n:KPY-A - [0:0]\n:KPY-B - [0:0]\n-X KPY-B\nCOMMIT\n")
    assert code == 0
    assert "KPY-B" not in fake.chains("nat")


# -- restore: what is refused -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param(
            "*nat\n:KPY-A - [0:0]\n-A KPY-A -j KPY-NOPE\nCOMMIT\n", 3, id="jump-to-missing"
        ),
        pytest.param("*nat\n-A KPY-Z -j RETURN\nCOMMIT\n", 2, id="chain-not-declared"),
        pytest.param("*bogus\n:KPY-A - [0:0]\nCOMMIT\n", 1, id="unknown-table"),
        pytest.param("*nat\n:KPY-A - [0:0]\n-A KPY-A --bogus -j RETURN\nCOMMIT\n", 3, id="option"),
        pytest.param("*nat\n:KPY-A - [0:0]\n-A KPY-A -m nosuch -j RETURN\nCOMMIT\n", 3, id="match"),
        pytest.param("*nat\n:KPY-A - [0:0]\n-A KPY-A --dport 80 -j RETURN\nCOMMIT\n", 3, id="no-p"),
        pytest.param(
            "*filter\n:KPY-F - [0:0]\n-A KPY-F -p tcp --dport 80 -m sctp -j REJECT\nCOMMIT\n",
            3,
            id="proto-module-mismatch",
        ),
        pytest.param(
            "*filter\n:KPY-F - [0:0]\n-A KPY-F -p tcp -j DNAT --to-destination 198.18.1.1:80\n"
            "COMMIT\n",
            3,
            id="dnat-outside-nat",
        ),
        pytest.param(
            "*nat\n:KPY-F - [0:0]\n-A KPY-F -p tcp -j REJECT\nCOMMIT\n", 3, id="reject-in-nat"
        ),
        pytest.param(
            "*nat\n:KPY-F - [0:0]\n-A KPY-F -j DNAT --to-destination 198.18.0.1:80\nCOMMIT\n",
            3,
            id="dnat-port-without-protocol",
        ),
        pytest.param(
            "*nat\n:KPY-A - [0:0]\n-A KPY-A -m statistic --mode random --probability 2 -j RETURN\n"
            "COMMIT\n",
            3,
            id="probability-above-one",
        ),
        pytest.param(
            "*nat\n:KPY-A - [0:0]\n-A KPY-A -s 2001:db8::1 -j RETURN\nCOMMIT\n", 3, id="v6"
        ),
        pytest.param("*nat\n-N PREROUTING\nCOMMIT\n", 2, id="new-existing-chain"),
        pytest.param(":KPY-A - [0:0]\n", 1, id="no-table"),
    ],
)
def test_restore_refuses_what_the_kernel_refuses(text: str, line: int) -> None:
    fake = IptablesFake()
    code, err = restore(fake, text)
    assert code != 0
    assert f"line: {line}" in err or f"line {line}:" in err
    assert all(not chain.startswith("KPY-") for chain in fake.chains("nat") + fake.chains("filter"))


def test_legacy_names_the_failed_line_like_iptables_restore() -> None:
    fake = IptablesFake()
    code, err = restore(
        fake, "*nat\n:KPY-A - [0:0]\n-X KPY-NOPE\nCOMMIT\n", tool="iptables-legacy-restore"
    )
    assert code == 1
    assert "iptables-restore: line 3 failed" in err


def test_missing_commit_is_refused_and_nothing_is_applied() -> None:
    fake = IptablesFake()
    code, err = restore(fake, "*nat\n:KPY-A - [0:0]\n-A KPY-A -j RETURN\n")
    assert code == 1
    assert "COMMIT expected at line 4" in err
    assert "KPY-A" not in fake.chains("nat")


def test_delete_of_a_referenced_chain_is_refused() -> None:
    fake = IptablesFake()
    fake.seed("*nat\n:KPY-A - [0:0]\n:KPY-B - [0:0]\n-A KPY-A -j KPY-B\nCOMMIT\n")
    code, err = restore(fake, "*nat\n:KPY-B - [0:0]\n-X KPY-B\nCOMMIT\n")
    assert code == 4
    assert "line 3: CHAIN_DEL failed (Device or resource busy)" in err
    assert fake.rules("nat", "KPY-A") == ["-A KPY-A -j KPY-B"]


def test_delete_of_a_non_empty_chain_is_refused_unless_flushed() -> None:
    fake = IptablesFake()
    fake.seed("*nat\n:KPY-B - [0:0]\n-A KPY-B -j RETURN\nCOMMIT\n")
    assert restore(fake, "*nat\n-X KPY-B\nCOMMIT\n")[0] != 0
    assert restore(fake, "*nat\n-F KPY-B\n-X KPY-B\nCOMMIT\n")[0] == 0


def test_hook_bound_targets_are_checked_on_every_path() -> None:
    fake = IptablesFake()
    code, err = restore(
        fake,
        "*nat\n:KPY-H - [0:0]\n-A KPY-H -j MASQUERADE\n-A POSTROUTING -j KPY-H\n"
        "-A PREROUTING -j KPY-H\nCOMMIT\n",
    )
    assert code == 4
    assert "line 5:" in err  # nft blames the rule that made the path
    code, err = restore(
        fake,
        "*nat\n:KPY-H - [0:0]\n-A KPY-H -j MASQUERADE\n-A PREROUTING -j KPY-H\nCOMMIT\n",
        tool="iptables-legacy-restore",
    )
    assert "line 5 failed" in err  # legacy blames the COMMIT line


def test_loops_are_refused() -> None:
    fake = IptablesFake()
    code, _ = restore(
        fake,
        "*nat\n:KPY-A - [0:0]\n:KPY-B - [0:0]\n-A KPY-A -j KPY-B\n-A KPY-B -j KPY-A\n"
        "-A OUTPUT -j KPY-A\nCOMMIT\n",
    )
    assert code != 0


def test_each_table_commits_on_its_own() -> None:
    """Measured on 1.8.9: a failing nat section keeps the filter section before it."""
    fake = IptablesFake()
    code, _ = restore(
        fake,
        "*filter\n:KPY-G - [0:0]\nCOMMIT\n*nat\n:KPY-H - [0:0]\n-A KPY-H --bogus\nCOMMIT\n",
    )
    assert code == 2
    assert "KPY-G" in fake.chains("filter")
    assert "KPY-H" not in fake.chains("nat")


def test_variants_and_families_keep_separate_tables() -> None:
    fake = IptablesFake()
    fake.seed("*nat\n:KPY-A - [0:0]\nCOMMIT\n", variant="legacy")
    assert "KPY-A" in fake.chains("nat", variant="legacy")
    assert fake.chains("nat", variant="nft") == []
    assert fake.run(["iptables-legacy-save"]).stdout.count(":KPY-A") == 1
    assert ":KPY-A" not in fake.run(["iptables-nft-save"]).stdout


def test_uninstalled_tools_are_not_found() -> None:
    fake = IptablesFake(installed=("nft",))
    assert fake.run(["iptables-legacy-save"]).returncode == 127


# -- single commands ----------------------------------------------------------------------


def test_check_insert_delete_and_list() -> None:
    fake = IptablesFake()
    fake.seed("*nat\n:KPY-SERVICES - [0:0]\nCOMMIT\n")
    spec = ["-m", "comment", "--comment", "kpy service portals", "-j", "KPY-SERVICES"]
    base = ["iptables-nft", "-w", "5", "-t", "nat"]
    assert fake.run([*base, "-C", "PREROUTING", *spec]).returncode == 1
    assert fake.run([*base, "-I", "PREROUTING", "1", *spec]).ok
    assert fake.run([*base, "-C", "PREROUTING", *spec]).ok
    listed = fake.run([*base, "-S", "PREROUTING"]).stdout
    assert listed == (
        "-P PREROUTING ACCEPT\n"
        '-A PREROUTING -m comment --comment "kpy service portals" -j KPY-SERVICES\n'
    )
    assert fake.run([*base, "-D", "PREROUTING", *spec]).ok
    deleted_again = fake.run([*base, "-D", "PREROUTING", *spec])
    assert deleted_again.returncode == 1
    assert "Bad rule" in deleted_again.stderr


def test_check_with_a_missing_target_chain_fails_like_iptables() -> None:
    fake = IptablesFake()
    result = fake.run(["iptables-nft", "-t", "nat", "-C", "PREROUTING", "-j", "KPY-GONE"])
    assert result.returncode == 2


def test_new_chain_twice_and_delete_of_a_non_empty_chain_are_refused() -> None:
    fake = IptablesFake()
    assert fake.run(["iptables-nft", "-t", "nat", "-N", "DOCKER"]).ok
    again = fake.run(["iptables-nft", "-t", "nat", "-N", "DOCKER"])
    assert again.returncode == 1
    assert "Chain already exists" in again.stderr
    assert fake.run(["iptables-nft", "-t", "nat", "-A", "DOCKER", "-j", "RETURN"]).ok
    assert fake.run(["iptables-nft", "-t", "nat", "-X", "DOCKER"]).returncode == 1
    assert fake.run(["iptables-nft", "-t", "nat", "-S", "NOPE"]).returncode == 1


def test_a_held_lock_times_out_with_iptables_message() -> None:
    fake = IptablesFake()
    fake.hold_lock(1)
    result = fake.run(list(RESTORE), stdin="*nat\nCOMMIT\n")
    assert result.returncode == 4
    assert "holding the xtables lock" in result.stderr
    assert fake.run(list(RESTORE), stdin="*nat\nCOMMIT\n").ok


def test_refused_fragments_fail_like_a_missing_kernel_module() -> None:
    fake = IptablesFake()
    fake.refuse("--random-fully")
    code, err = restore(
        fake, "*nat\n:KPY-P - [0:0]\n-A KPY-P -j MASQUERADE --random-fully\nCOMMIT\n"
    )
    assert code == 4
    assert "line 3" in err


# -- the packet-flow tracer ----------------------------------------------------------------

CASCADE = (
    "*nat\n:KPY-S - [0:0]\n:KPY-A - [0:0]\n:KPY-B - [0:0]\n:KPY-C - [0:0]\n:KPY-M - [0:0]\n"
    ":KPY-POST - [0:0]\n"
    "-A PREROUTING -j KPY-S\n-A OUTPUT -j KPY-S\n-A POSTROUTING -j KPY-POST\n"
    "-A KPY-POST -m mark ! --mark 0x4000/0x4000 -j RETURN\n"
    "-A KPY-POST -j MASQUERADE\n"
    "-A KPY-M -j MARK --or-mark 0x4000\n"
    "-A KPY-S ! -s 198.18.64.0/18 -d 198.19.0.10/32 -p tcp -m tcp --dport 80 -j KPY-M\n"
    "-A KPY-S -d 198.19.0.10/32 -p tcp -m tcp --dport 80 "
    "-m statistic --mode random --probability 0.3333333333 -j KPY-A\n"
    "-A KPY-S -d 198.19.0.10/32 -p tcp -m tcp --dport 80 "
    "-m statistic --mode random --probability 0.5000000000 -j KPY-B\n"
    "-A KPY-S -d 198.19.0.10/32 -p tcp -m tcp --dport 80 -j KPY-C\n"
    "-A KPY-A -p tcp -j DNAT --to-destination 198.18.64.7:8080\n"
    "-A KPY-B -p tcp -j DNAT --to-destination 198.18.64.8:8080\n"
    "-A KPY-C -p tcp -j DNAT --to-destination 198.18.64.9:8080\n"
    "COMMIT\n"
)


def test_trace_follows_every_branch_of_the_statistic_cascade() -> None:
    fake = IptablesFake()
    fake.seed(CASCADE)
    flow = trace(fake.tables(), src="198.18.64.5", dst="198.19.0.10", proto="tcp", dport=80)
    assert flow.endpoints == {"198.18.64.7:8080", "198.18.64.8:8080", "198.18.64.9:8080"}
    assert not flow.masqueraded
    for chance in flow.probabilities().values():
        assert chance == pytest.approx(1 / 3, abs=1e-6)


def test_trace_applies_marks_and_masquerades_in_postrouting() -> None:
    fake = IptablesFake()
    fake.seed(CASCADE)
    flow = trace(fake.tables(), src="203.0.113.9", dst="198.19.0.10", proto="tcp", dport=80)
    assert flow.masqueraded
    assert len(flow.endpoints) == 3


def test_trace_of_unmatched_traffic_is_accepted_unchanged() -> None:
    fake = IptablesFake()
    fake.seed(CASCADE)
    flow = trace(fake.tables(), src="198.18.64.5", dst="198.19.0.10", proto="udp", dport=80)
    assert flow.endpoints == set()
    assert flow.verdicts == {"ACCEPT"}
    assert [path.destination for path in flow.paths] == ["198.19.0.10:80"]


def test_trace_refuses_to_guess_unknown_matches() -> None:
    fake = IptablesFake()
    fake.seed("*nat\n-A PREROUTING -m recent --name x --update -j RETURN\nCOMMIT\n")
    with pytest.raises(UnsupportedRuleError):
        trace(fake.tables(), src="198.18.64.5", dst="198.19.0.10", proto="tcp", dport=80)


def test_trace_reaches_filter_input_for_local_destinations() -> None:
    fake = IptablesFake()
    fake.seed(
        "*filter\n:KPY-E - [0:0]\n-A INPUT -j KPY-E\n"
        "-A KPY-E -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 30080 -j REJECT\nCOMMIT\n"
    )
    local = ["198.18.0.1"]
    flow = trace(
        fake.tables(),
        src="203.0.113.9",
        dst="198.18.0.1",
        proto="tcp",
        dport=30080,
        local_addresses=local,
    )
    assert flow.rejected
    forwarded = trace(
        fake.tables(),
        src="203.0.113.9",
        dst="198.18.5.5",
        proto="tcp",
        dport=30080,
        local_addresses=local,
    )
    assert forwarded.verdicts == {"ACCEPT"}
