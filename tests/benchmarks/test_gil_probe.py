"""``benchmarks.gil_probe`` at a tiny size: every condition runs in a process of its own and reports its rows."""

from __future__ import annotations

import pytest

from benchmarks.gil_probe import NO_FOLLOWER, condition_name, main, run


def test_the_probe_reports_lateness_beside_the_anchor_and_applies_what_was_published() -> None:
    report = run(ids=2_000, rounds=1, seconds=1.0, switch_ms=(0.5,), scopes=("all", "bulk"))
    rows = {r.name: r for r in report.rows}
    followers = [condition_name((0.5, "all")), condition_name((0.5, "bulk"))]
    assert followers[0] != followers[1]
    for name in (NO_FOLLOWER, *followers):
        assert 0 <= rows[f"{name}: wake-up lateness p50"].value <= rows[f"{name}: wake-up lateness max"].value
        assert rows[f"{name}: deltas published"].value >= 1  # the first delta goes out as the probe starts
    for follower in followers:
        p99 = rows[f"{follower}: wake-up lateness p99"]
        assert p99.anchor == NO_FOLLOWER and p99.anchor_value == rows[f"{NO_FOLLOWER}: wake-up lateness p99"].value
        assert rows[f"{follower}: deltas applied"].value == rows[f"{follower}: deltas published"].value


@pytest.mark.parametrize(("argv", "message"), [
    (["--rounds", "0"], "--rounds must be at least 1, got 0"),
    (["--seconds", "0"], "--seconds must be above 0, got 0"),
    (["--ids", "1"], "--ids must be at least 2, got 1"),
    (["--switch-ms", "5", "-1"], "every --switch-ms must be above 0, got [5.0, -1.0]"),
    (["--scopes", "bulk", "some"], "every --scopes must be one of ['bulk', 'all'], got ['bulk', 'some']"),
])
def test_bad_arguments_are_refused_before_anything_runs(argv: list[str], message: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
