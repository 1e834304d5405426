"""uv.lock is what the tests ran with: `make install` syncs .venv to it, and it must agree with pyproject.toml."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def uv() -> Path:
    """The uv the Makefile pins (`make install` puts it in .tools/)."""
    version = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    path = ROOT / ".tools" / f"uv-{version}" / "bin" / "uv"
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `make install`")
    return path


def _check(uv: Path, project: Path) -> subprocess.CompletedProcess[str]:
    """`uv lock --check` without the network: a lock that agrees with pyproject.toml needs no index."""
    return subprocess.run([uv, "lock", "--check", "--offline", "--project", project],
                          capture_output=True, text=True, timeout=120)


def test_the_lock_agrees_with_pyproject(uv: Path) -> None:
    result = _check(uv, ROOT)
    assert result.returncode == 0, f"uv.lock is out of date with pyproject.toml (run `make lock`):\n{result.stderr}"


def test_the_check_fails_when_pyproject_changes(uv: Path, tmp_path: Path) -> None:
    """The check must be able to fail: a copy passes, then the same copy with torch's lower bound raised (the
    locked torch still fits it) does not."""
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    assert _check(uv, tmp_path).returncode == 0
    pyproject = tmp_path / "pyproject.toml"
    edited = re.sub(r'"torch>=[^"]*"', '"torch>=2.5"', pyproject.read_text())
    assert edited != pyproject.read_text()
    pyproject.write_text(edited)
    lock = (tmp_path / "uv.lock").read_bytes()
    assert _check(uv, tmp_path).returncode != 0
    assert (tmp_path / "uv.lock").read_bytes() == lock
