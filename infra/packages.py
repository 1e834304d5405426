"""Debian packages the local servers need (``redis-server``, ``prometheus``, ``chromium``), installed with ``apt-get`` when
their binary is missing. Installing needs root, as in our CI and dev containers; elsewhere the error says
which package to install."""

from __future__ import annotations

import os
import shutil
import subprocess

LOCK_TIMEOUT_S = 300
"""How long apt-get waits for another apt-get or dpkg holding the package lock before it gives up."""


class PackageError(RuntimeError):
    """A package could not be installed."""


def ensure_installed(binary: str, package: str) -> str:
    """Path of ``binary``, installing Debian's ``package`` first if it is not on ``PATH``."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0:
        raise PackageError(f"{binary} is not installed and installing it needs root: apt-get install -y {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_TIMEOUT_S}", "install", "-y", "--no-install-recommends",
               package]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        # A fresh container has no package lists yet.
        subprocess.run(["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_TIMEOUT_S}", "update"], env=env,
                       capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise PackageError(f"apt-get install {package} failed: {done.stderr[-2000:]}")
    found = shutil.which(binary)
    if not found:
        raise PackageError(f"apt-get installed {package} but {binary} is not on PATH")
    return found


__all__ = ["PackageError", "ensure_installed"]
