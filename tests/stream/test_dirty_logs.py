"""Replay of dirty logs: every good row replays, every bad row is in the rejects with its line or row and
reason, and a file that cannot be read at all is one line and a non-zero exit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from infra.cli import app
from stream.events import encode
from stream.logcheck import REASONS
from stream.replay import ReplayConfig, replay
from tests.stream.test_logfile import KUAIRAND_HEADER, T0

KR_HEADER = [*KUAIRAND_HEADER, "extra_col"]  # an unknown column: ignored, reported, not a reject
MS_HEADER = ["type", "request_id", "user_id", "item_id", "ts_ms", "click", "long_view", "like", "comment", "follow",
             "forward", "play_time", "note"]


def kr_good(i: int) -> dict[str, str]:
    row = dict.fromkeys(KR_HEADER, "0")
    row |= {"user_id": str(i % 13), "video_id": str(i % 29), "time_ms": str(T0 + 7 * i), "date": "20220408",
            "is_click": str(i % 2), "long_view": str(i % 3 == 0), "play_time_ms": str(1000 + i), "extra_col": "x"}
    row["long_view"] = "1" if i % 3 == 0 else "0"
    return row


def ms_good(i: int) -> dict[str, str]:
    row = dict.fromkeys(MS_HEADER, "")
    row |= {"type": "impression" if i % 2 == 0 else "feedback", "request_id": f"r{i // 2}", "user_id": str(i % 11),
            "item_id": str(i // 2), "ts_ms": str(T0 + 5 * i), "note": "n"}
    if i % 2:
        row |= {"click": str(i % 4 == 1 and 1 or 0), "play_time": f"{i}.5"}
    return row


# kind -> (reason, how a good row is broken); None: the row is replaced by a copy of the row before it
BREAKS = {
    "kuairand": {
        "truncated": ("field_count", lambda r: list(r.values())[:7]),
        "too_long": ("field_count", lambda r: [*r.values(), "9"]),
        "text": ("not_a_number", lambda r: r | {"is_click": "yes"}),
        "missing": ("missing_value", lambda r: r | {"user_id": ""}),
        "no_label": ("missing_value", lambda r: r | {c: "" for c in ("is_click", "is_like", "is_follow", "is_comment",
                                                                      "is_forward", "long_view", "play_time_ms")}),
        "negative_time": ("bad_timestamp", lambda r: r | {"time_ms": "-5"}),
        "future_time": ("bad_timestamp", lambda r: r | {"time_ms": "99999999999999"}),
        "bad_id": ("bad_id", lambda r: r | {"video_id": "-1"}),
        "label": ("bad_label", lambda r: r | {"is_like": "2"}),
        "duplicate": ("duplicate", None),
    },
    "moestream": {
        "truncated": ("field_count", lambda r: list(r.values())[:3]),
        "too_long": ("field_count", lambda r: [*r.values(), "9"]),
        "text": ("not_a_number", lambda r: r | {"user_id": "abc"}),
        "missing": ("missing_value", lambda r: r | {"request_id": ""}),
        "type": ("bad_type", lambda r: r | {"type": "view"}),
        "negative_time": ("bad_timestamp", lambda r: r | {"ts_ms": "-1"}),
        "future_time": ("bad_timestamp", lambda r: r | {"ts_ms": "99999999999999"}),
        "request_id": ("bad_request_id", lambda r: r | {"request_id": "r" * 129}),
        "label": ("bad_label", lambda r: r | {"type": "feedback", "click": "3"}),
        "duplicate": ("duplicate", None),
    },
}


def dirty_log(path: Path, schema: str, kinds: list[str | None]) -> tuple[Path, Path, dict[int, str]]:
    """A log whose i-th row is good (None) or broken the way ``kinds[i]`` says; also the same log with only
    its good rows, and the reason expected for each bad row (by row index)."""
    header, good = (KR_HEADER, kr_good) if schema == "kuairand" else (MS_HEADER, ms_good)
    csv = path.suffix == ".csv"
    rows: list[list[str]] = []
    clean: list[list[str]] = []
    expected: dict[int, str] = {}
    for i, kind in enumerate(kinds):
        row = good(i)
        if kind is None or (kind == "duplicate" and not rows) or (not csv and kind in ("truncated", "too_long")):
            rows.append(list(row.values()))
            clean.append(rows[-1])
            continue
        reason, broken = BREAKS[schema][kind]
        if broken is None:
            rows.append(list(rows[-1]))
            if rows[-2] not in clean[-1:]:  # a copy of a bad row is rejected for the first row's reason
                reason = expected[i - 1]
        else:
            out = broken(row)
            rows.append(out if isinstance(out, list) else list(out.values()))
        expected[i] = reason
    write(path, header, rows)
    clean_path = path.with_name("clean" + path.suffix)
    write(clean_path, header, clean)
    return path, clean_path, expected


def write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    if path.suffix == ".csv":
        path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    else:
        pq.write_table(pa.table({c: pa.array([r[j] or None for r in rows], pa.string())
                                 for j, c in enumerate(header)}), path, row_group_size=50)


def kinds_for(schema: str, fmt: str, n: int = 600, every: int = 6) -> list[str | None]:
    """``n`` rows, each kind of break on one row in ``len(BREAKS) * every``: >= 1% of rows of each kind."""
    kinds = [k for k in BREAKS[schema] if fmt == "csv" or BREAKS[schema][k][0] != "field_count"]
    out: list[str | None] = [None] * n
    for j, i in enumerate(range(3, n, every)):
        out[i] = kinds[j % len(kinds)]
    return out


def replayed(path: Path, tmp: Path, **options) -> tuple[list[dict], object, list[dict]]:
    got: list[dict] = []
    rejects = tmp / f"{path.stem}-rejects.jsonl"
    result = replay(ReplayConfig(path, progress=False, rejects_path=rejects, **options), got.extend)
    return got, result, [orjson.loads(line) for line in rejects.read_bytes().splitlines()]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("schema", ["kuairand", "moestream"])
def test_every_good_row_replays_and_every_bad_row_is_rejected_with_its_reason(tmp_path: Path, schema: str,
                                                                               fmt: str) -> None:
    kinds = kinds_for(schema, fmt)
    path, clean, expected = dirty_log(tmp_path / f"log.{fmt}", schema, kinds)
    for reason in {BREAKS[schema][k][0] for k in kinds if k}:
        assert sum(r == reason for r in expected.values()) >= 0.01 * len(kinds) - (reason == "duplicate")
    got, result, rejects = replayed(path, tmp_path, chunk_rows=64)
    want, _, none = replayed(clean, tmp_path, chunk_rows=64)
    assert none == [] and len(want) > 0
    assert sorted(map(encode, got)) == sorted(map(encode, want))  # every good row, as it is
    where = "line" if fmt == "csv" else "row"
    assert {r[where] - (2 if fmt == "csv" else 0): r["reason"] for r in rejects} == expected
    assert set(result.rejected) <= set(REASONS)
    assert result.rejected == {reason: list(expected.values()).count(reason) for reason in set(expected.values())}
    assert result.unknown_columns == (("extra_col",) if schema == "kuairand" else ("note",))
    if fmt == "csv":
        lines = path.read_text().splitlines()
        assert all(r["raw"] == lines[r["line"] - 1] for r in rejects)
    else:
        assert all(isinstance(r["raw"], dict) and r["detail"] for r in rejects)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_same_dirty_file_gives_the_same_rejects_and_positions(tmp_path: Path, fmt: str) -> None:
    path, _, _ = dirty_log(tmp_path / f"log.{fmt}", "kuairand", kinds_for("kuairand", fmt, n=300))
    full, result, rejects = replayed(path, tmp_path, chunk_rows=40, batch_size=17)
    for n in (0, 1, 101, len(full) - 1, len(full)):
        head, stopped, _ = replayed(path, tmp_path, chunk_rows=40, batch_size=17, limit=n)
        rest, resumed, again = replayed(path, tmp_path, chunk_rows=40, batch_size=17, start=stopped.position)
        assert head + rest == full and resumed.position == result.position
        assert again == rejects  # the whole file was read again: the same rejects, whatever the chunking
    _, _, other_chunking = replayed(path, tmp_path, chunk_rows=7)
    assert other_chunking == rejects


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.none(), st.sampled_from(sorted(BREAKS["kuairand"]))), min_size=1, max_size=40),
       st.sampled_from(["csv", "parquet"]), st.sampled_from(["kuairand", "moestream"]), st.integers(1, 12))
def test_any_mix_of_good_and_bad_rows_loses_nothing(tmp_path_factory, kinds, fmt, schema, chunk_rows) -> None:
    kinds = [k if k in BREAKS[schema] else None for k in kinds]
    tmp = tmp_path_factory.mktemp("mix")
    path, clean, expected = dirty_log(tmp / f"log.{fmt}", schema, kinds)
    got, result, rejects = replayed(path, tmp, chunk_rows=chunk_rows)
    want, _, _ = replayed(clean, tmp, chunk_rows=chunk_rows)
    assert sorted(map(encode, got)) == sorted(map(encode, want))
    assert {r["line" if fmt == "csv" else "row"] - (2 if fmt == "csv" else 0): r["reason"] for r in rejects} == expected
    assert sum(result.rejected.values()) == len(expected)


# ------------------------------------------------------------------------------------------------ the CLI


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["replay", *args], env={"COLUMNS": "400"})
    return result.exit_code, result.output


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("missing.csv", None, "no such file"),
        ("empty.csv", b"", "empty file"),
        ("empty.parquet", b"", "empty file"),
        ("log.json", b'{"a": 1}\n', "neither a CSV nor a Parquet file"),
        ("text.parquet", b"user_id,video_id\n1,2\n", "not a readable Parquet file"),
        ("binary.csv", bytes(range(256)) * 4, "not a readable CSV text file"),
        ("wrong.csv", b"uid,vid,ts\n1,2,3\n", "unknown log schema"),
    ],
)
def test_a_file_that_cannot_be_read_is_one_line_and_a_non_zero_exit(tmp_path: Path, name: str, content: bytes | None,
                                                                   why: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    code, output = cli(str(path), "--direct", "--data-root", str(tmp_path / "runs"))
    assert code != 0 and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1 and why in one_line(output) and name in output


def test_a_directory_is_not_a_log(tmp_path: Path) -> None:
    (tmp_path / "dir.csv").mkdir()
    code, output = cli(str(tmp_path / "dir.csv"))
    assert code != 0 and "is a directory" in one_line(output) and "Traceback" not in output


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_header_only_file_replays_no_events_and_says_so(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"header.{fmt}"
    write(path, KR_HEADER, [])
    got, result, rejects = replayed(path, tmp_path)
    assert (got, result.emitted, rejects, result.rejected) == ([], 0, [], {})


def test_replay_direct_trains_every_good_impression_of_a_dirty_log(tmp_path: Path) -> None:
    """End to end through the installed command: a dirty KuaiRand CSV trains, exit 0."""
    kinds = kinds_for("kuairand", "csv", n=400)
    path, _, expected = dirty_log(tmp_path / "kr.csv", "kuairand", kinds)
    good = len(kinds) - len(expected)
    done = subprocess.run(
        [str(Path(sys.executable).with_name("moestream")), "replay", str(path), "--direct",
         "--data-root", str(tmp_path / "root")],
        capture_output=True, text=True, env={"COLUMNS": "400", "PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled"},
        timeout=600,
    )
    output = one_line(done.stdout + done.stderr)
    assert done.returncode == 0, output
    assert "Traceback" not in output
    assert f"replayed {2 * good} events (kuairand)" in output
    assert int(re.search(r"trained (\d+) examples", output).group(1)) == good
    assert f"rejected {len(expected)} rows" in output
    rejects = list((tmp_path / "root" / "runs").glob("replay-*/rejects.jsonl"))
    assert len(rejects) == 1 and len(rejects[0].read_bytes().splitlines()) == len(expected)
