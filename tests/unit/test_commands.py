"""The subprocess runner (text and streamed inputs, early exits, timeouts, missing tools),
and handing free memory back."""

from __future__ import annotations

import gc
from collections.abc import Iterator

from proxy.kernel.commands import SubprocessRunner, joined
from proxy.memory import defer_collection, freeze_long_lived, release_free_memory


def chunks(count: int, size: int = 65536) -> Iterator[str]:
    for index in range(count):
        yield str(index % 10) * size


def test_a_streamed_input_reaches_the_tool_whole() -> None:
    result = SubprocessRunner().run(["wc", "-c"], stdin=chunks(64))  # 4 MiB, > a pipe buffer
    assert result.ok
    assert int(result.stdout.split()[0]) == 64 * 65536


def test_a_tool_that_stops_reading_early_is_reported_not_raised() -> None:
    result = SubprocessRunner().run(
        ["sh", "-c", "head -c 10 >/dev/null; echo refused >&2; exit 3"], stdin=chunks(64)
    )
    assert result.returncode == 3
    assert result.stderr.strip() == "refused"


def test_text_and_streamed_inputs_read_the_same() -> None:
    runner = SubprocessRunner()
    assert (
        runner.run(["cat"], stdin="a\nb\n").stdout
        == runner.run(["cat"], stdin=iter(["a\n", "b\n"])).stdout
    )


def test_a_streamed_run_past_its_timeout_is_killed() -> None:
    result = SubprocessRunner(timeout=0.5).run(["sleep", "10"], stdin=iter(["x"]))
    assert result.returncode == 124


def test_a_missing_tool_is_exit_status_127() -> None:
    for stdin in (None, "x", iter(["x"])):
        assert SubprocessRunner().run(["kpy-no-such-tool"], stdin=stdin).returncode == 127


def test_joined() -> None:
    assert joined(None) is None
    assert joined("ab") == "ab"
    assert joined(iter(["a", "b"])) == "ab"


def test_free_memory_goes_back_to_the_system_here() -> None:
    assert release_free_memory()  # glibc on this machine and in the image


def test_collection_is_deferred_at_start_then_the_heap_is_frozen() -> None:
    usual = gc.get_threshold()
    frozen = gc.get_freeze_count()
    try:
        defer_collection()
        assert gc.get_threshold()[0] > usual[0]
        keep = [object() for _ in range(10)]  # noqa: F841 (alive across the freeze)
        freeze_long_lived()
        assert gc.get_threshold() == usual
        assert gc.get_freeze_count() > frozen
    finally:
        gc.set_threshold(*usual)
        gc.unfreeze()
