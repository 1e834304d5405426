"""The Ray token a local instance uses is readable by its owner only (mode 600), and Ray itself reads it.

Ray (>= 2.59) writes a missing ``~/.ray/auth_token`` world-readable (644); ``init_ray`` writes it first.
Each test points ``HOME`` at its own directory, so the user's real token is never touched.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from infra.runtime import token_path, write_private_token


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_token_is_created_owner_only_whatever_the_umask(home: Path) -> None:
    previous = os.umask(0o000)  # the most permissive umask: the file's own mode must carry the restriction
    try:
        write_private_token()
    finally:
        os.umask(previous)
    path = home / ".ray" / "auth_token"
    assert token_path() == path
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # 256 random bits in hex, as Ray makes them


def test_a_world_readable_token_from_an_earlier_run_is_made_private_and_kept(home: Path) -> None:
    path = home / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("e" * 64)
    path.chmod(0o644)  # as Ray leaves it
    write_private_token()
    assert mode(path) == 0o600 and path.read_text() == "e" * 64


def test_the_path_ray_is_told_to_use_is_the_one_written(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    custom = home / "secrets" / "ray-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(custom))
    write_private_token()
    assert mode(custom) == 0o600 and not (home / ".ray").exists()


@pytest.mark.parametrize(("name", "value"), [("RAY_AUTH_MODE", "disabled"), ("RAY_AUTH_TOKEN", "f" * 64)])
def test_nothing_is_written_when_no_file_is_needed(home: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                                   value: str) -> None:
    monkeypatch.setenv(name, value)
    write_private_token()
    assert not (home / ".ray").exists()


def test_ray_reads_the_token_written(home: Path) -> None:
    """Ray's own token loader, in a fresh process with this ``HOME``, finds the token and not one of its own."""
    write_private_token()
    probe = ("from ray._raylet import AuthenticationTokenLoader as L\n"
             "print(L.instance().get_raw_token(ignore_auth_mode=True) if L.instance().has_token(ignore_auth_mode=True) "
             "else 'none')")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "HOME": str(home)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == (home / ".ray" / "auth_token").read_text()
