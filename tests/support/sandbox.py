"""Real faults for tests, without root: a read-only file system and a full disk, in a private mount namespace.

`unshare --map-root-user --mount` gives the command its own mount table (nothing outside it changes), where
`mount --bind -o ro` makes a folder read-only (EROFS, for root too) and a small tmpfs fills up for real
(ENOSPC). Tests skip with a reason where user namespaces are not available.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


@functools.lru_cache(maxsize=1)
def namespaces_available() -> str | None:
    """None when mount namespaces work here; else why not (a skip reason)."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        r = subprocess.run(
            ["unshare", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt || exit 3"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    return None if r.returncode == 0 else f"no unprivileged mount namespaces here: {r.stderr.decode()[:200]}"


def run(
    argv: list[str],
    *,
    read_only: list[str | os.PathLike] = (),
    tmpfs: dict[str | os.PathLike, str] | None = None,
    timeout: float = 300,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run `argv` (from the repository root, this checkout first on sys.path) with the `read_only` folders
    bind-mounted read-only and a tmpfs of the given size ("64k") mounted on each `tmpfs` folder."""
    steps = []
    for d, size in (tmpfs or {}).items():
        steps.append(f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(d))}")
    for d in read_only:
        q = shlex.quote(str(d))
        steps += [f"mount --bind {q} {q}", f"mount -o remount,bind,ro {q}"]
    steps.append("exec " + " ".join(shlex.quote(str(a)) for a in argv))
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", " && ".join(steps)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def python(code: str, **kw) -> subprocess.CompletedProcess:
    """`run` of `python -c code` with this interpreter."""
    return run([sys.executable, "-c", code], **kw)
