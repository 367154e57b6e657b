"""Peer virtualenvs and child-process measurements for the benchmarks (stdlib only).

Every contender of a benchmark, tieredcache included, is measured in a child
process that prints one JSON line, so all of them run under the same
conditions: a fresh interpreter of the same CPython build, nothing else
imported. Peers whose pins conflict with the project (cacheme pins an old
redis-py, cashews 7.x wants its own) live in their own virtualenv under
``benchmarks/.venvs/<peer>`` (gitignored), created on first use from the
latest release on PyPI::

    python = peers.python_for("cashews")      # creates the venv if needed
    result = peers.measure("cashews", "benchmarks/bench_l1_hit.py", "cashews_async", {...})

``peers.ensure_all()`` (or ``python benchmarks/peers.py``) creates every venv;
``--upgrade`` reinstalls them from the newest releases.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = HERE / ".venvs"
PROJECT_VENV = ROOT / ".venv"
RESULT_MARK = "@@RESULT@@ "

# venv name -> pip requirements (unpinned: the newest release is what we compare against).
PEERS: dict[str, list[str]] = {
    "theine": ["theine"],
    "dogpile": ["dogpile.cache", "redis", "hiredis"],
    "cashews": ["cashews[redis]", "hiredis"],
    "aiocache": ["aiocache[redis]", "hiredis"],
    "cacheme": ["cacheme[redis]", "hiredis"],
    "plot": ["matplotlib"],
}
# The distribution names whose versions a report names, per venv.
DISTRIBUTIONS: dict[str, list[str]] = {
    "project": ["tieredcache", "redis", "hiredis", "cachetools", "msgspec"],
    "theine": ["theine", "theine-core"],
    "dogpile": ["dogpile.cache", "redis", "hiredis"],
    "cashews": ["cashews", "redis", "hiredis"],
    "aiocache": ["aiocache", "redis", "hiredis"],
    "cacheme": ["cacheme", "redis", "hiredis", "theine", "theine-core"],
    "plot": ["matplotlib"],
}


class PeerError(RuntimeError):
    """A peer venv could not be created or a measurement child failed; the message says why."""


# The library is edited while benchmarks run: every "project" child imports one copy of
# it, taken when the benchmark starts (see snapshot), so a run never mixes versions.
# source -> {"path": the copy's directory (put first on PYTHONPATH), "desc": for reports}
_SNAPSHOTS: dict[str, dict[str, str]] = {}
_DEFAULT: dict[str, str] = {}


def snapshot(source: str = "worktree") -> dict[str, str]:
    """Copy a tieredcache source tree's ``tieredcache/`` for the children to import.

    ``source``: ``worktree`` (this repository's working tree), ``head`` (its last
    commit) or the path of any source tree (a directory holding ``tieredcache/``,
    e.g. a git worktree of another branch or a frozen checkout). A working tree or
    path whose copy does not import (the library is mid-edit) falls back to its
    HEAD, and the description says so. Taken once per source and run.
    """
    root = ROOT if source in ("worktree", "head") else Path(source).expanduser().resolve()
    use_head = source == "head"
    key = f"head:{root}" if use_head else str(root)
    if key in _SNAPSHOTS:
        return _SNAPSHOTS[key]
    if not (root / "tieredcache" / "__init__.py").is_file():
        raise PeerError(f"{root} is not a tieredcache source tree (no tieredcache/__init__.py)")
    snap = Path(tempfile.mkdtemp(prefix="tieredcache-bench-src-"))
    atexit.register(shutil.rmtree, snap, True)
    where = "" if root == ROOT else f" in {root}"
    note = ""
    if not use_head:
        shutil.copytree(
            root / "tieredcache",
            snap / "tieredcache",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        error = _import_error(snap)
        if error is None:
            entry = {"path": str(snap), "desc": tree_state(root) + f" (working tree{where})"}
            _SNAPSHOTS[key] = entry
            return entry
        shutil.rmtree(snap / "tieredcache")
        note = f"; the working tree did not import ({error}), so HEAD was measured"
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", "HEAD", "tieredcache"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(snap)], input=archive.stdout, check=True)
    error = _import_error(snap)
    if error is not None:
        raise PeerError(f"tieredcache at HEAD{where} does not import either: {error}")
    entry = {"path": str(snap), "desc": f"tieredcache at {_head(root)} (committed{where}){note}"}
    _SNAPSHOTS[key] = entry
    return entry


def use_snapshot(source: str = "worktree") -> str:
    """Take :func:`snapshot` of ``source`` and make it what "project" children import
    unless :func:`measure` is given another source. Returns its description."""
    _DEFAULT.update(snapshot(source))
    return _DEFAULT["desc"]


def _import_error(path: Path) -> str | None:
    done = subprocess.run(
        [str(_venv_python(PROJECT_VENV)), "-c", "import tieredcache; print(tieredcache.__file__)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(path)},
        cwd=path,  # `-c` puts the current directory first on sys.path
        check=False,
    )
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["?"])[-1][:160]
    if not done.stdout.strip().startswith(str(path)):  # the editable install won
        return f"the copy is shadowed: tieredcache imported from {done.stdout.strip()}"
    return None


def _head(root: Path = ROOT) -> str:
    return subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def _base_python() -> str:
    """The interpreter the project venv was made from, so every venv runs the same CPython."""
    cfg = PROJECT_VENV / "pyvenv.cfg"
    if cfg.exists():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "executable" and Path(value.strip()).exists():
                return value.strip()
    return getattr(sys, "_base_executable", sys.executable)


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(name: str, *, upgrade: bool = False, quiet: bool = True) -> Path:
    """Create ``benchmarks/.venvs/<name>`` with the peer's requirements, once (idempotent)."""
    if name == "project":
        python = _venv_python(PROJECT_VENV)
        if not python.exists():
            raise PeerError("the project venv is missing; run: bash scripts/bootstrap.sh")
        return python
    if name not in PEERS:
        raise PeerError(f"unknown peer venv {name!r}; known: {sorted(PEERS)}")
    venv = VENVS / name
    python = _venv_python(venv)
    stamp = venv / ".peer-requirements"
    wanted = "\n".join(PEERS[name])
    if python.exists() and stamp.exists() and stamp.read_text() == wanted and not upgrade:
        return python
    if not python.exists():
        _run([_base_python(), "-m", "venv", str(venv)], f"create venv {name}")
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    if quiet:
        cmd.append("-q")
    if upgrade:
        cmd.append("--upgrade")
    _run([*cmd, *PEERS[name]], f"pip install {' '.join(PEERS[name])}")
    stamp.write_text(wanted)
    return python


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise PeerError(f"{what} failed (exit {done.returncode}):\n{tail}")


def python_for(venv: str) -> Path:
    return ensure_venv(venv)


def ensure_all(*, upgrade: bool = False) -> dict[str, str]:
    """Create every peer venv; returns venv -> "ok" or the error."""
    status: dict[str, str] = {}
    for name in PEERS:
        try:
            ensure_venv(name, upgrade=upgrade)
            status[name] = "ok"
        except PeerError as exc:
            status[name] = str(exc)
    return status


def versions(venv: str, distributions: Iterable[str] | None = None) -> dict[str, str]:
    """Installed versions of ``distributions`` in a venv (``"-"`` when missing)."""
    names = list(distributions if distributions is not None else DISTRIBUTIONS.get(venv, []))
    code = (
        "import json, sys\n"
        "from importlib import metadata\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = metadata.version(n)\n"
        "    except metadata.PackageNotFoundError: out[n] = '-'\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [str(ensure_venv(venv)), "-c", code, *names], capture_output=True, text=True, check=True
    )
    return dict(json.loads(done.stdout))


def measure(
    venv: str,
    script: str | Path,
    contender: str,
    params: Mapping[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Run ``<venv python> <script> --child <contender> <json params>``; return its JSON.

    The child prints its result as one line starting with :data:`RESULT_MARK`
    (see :func:`child_main`); anything else it prints is kept for the error. A
    "project" child imports the :func:`snapshot` of ``source`` (default: the one
    :func:`use_snapshot` chose), and the parent checks that it did.
    """
    python = ensure_venv(venv)
    cmd = [str(python), str(script), "--child", contender, json.dumps(dict(params or {}))]
    child_env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    child_env.pop("PYTHONPATH", None)
    copy = ""
    if venv == "project":
        if source is not None:
            copy = snapshot(source)["path"]
        else:
            if not _DEFAULT:
                use_snapshot()
            copy = _DEFAULT["path"]
        child_env["PYTHONPATH"] = copy  # ahead of the editable install's .pth entry
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=child_env
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"{contender} ({venv}) timed out after {timeout:.0f} s") from exc
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
            if "error" in result:
                raise PeerError(f"{contender} ({venv}): {result['error']}")
            imported = result.get("tieredcache_file")
            if copy and imported and not imported.startswith(copy):
                raise PeerError(f"{contender}: imported {imported}, not the copy in {copy}")
            return result
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
    raise PeerError(f"{contender} ({venv}) exited {done.returncode} without a result:\n{tail}")


def child_main(contenders: Mapping[str, Any]) -> bool:
    """If this process is a measurement child, run it, print the result and return True.

    Call it first thing in a benchmark's ``main``: ``if peers.child_main(CHILDREN): return``.
    """
    if len(sys.argv) < 3 or sys.argv[1] != "--child":
        return False
    name = sys.argv[2]
    params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    try:
        result = contenders[name](**params)
    except Exception as exc:  # reported to the parent, which records it and goes on
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    if "tieredcache" in sys.modules and isinstance(result, dict):
        result["tieredcache_file"] = getattr(sys.modules["tieredcache"], "__file__", None)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return True


# --------------------------------------------------------------------------- reporting


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "tree": _DEFAULT.get("desc") or tree_state(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "date": time.strftime("%Y-%m-%d"),
    }


def tree_state(root: Path = ROOT) -> str:
    """The commit checked out in ``root``, and whether its library had uncommitted changes."""
    try:
        sha = _head(root)
        dirty = subprocess.run(
            # --no-optional-locks: a read-only look that never rewrites the index.
            [
                "git",
                "--no-optional-locks",
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--",
                "tieredcache",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"tieredcache at {sha}" + (" + uncommitted changes" if dirty else "")


def add_source_argument(parser: Any) -> None:
    parser.add_argument(
        "--source",
        default="worktree",
        metavar="worktree|head|PATH",
        help="the tieredcache to measure: a copy of this working tree (default; its HEAD "
        "if it does not import), its HEAD, or the root of any tieredcache source tree "
        "(e.g. /work/before)",
    )


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    lines = [fmt(headers), "| " + " | ".join("-" * w for w in widths) + " |"]
    lines.extend(fmt(row) for row in rows)
    return "\n".join(lines)


def update_results(section: str, body: str, path: Path = HERE / "RESULTS.md") -> None:
    """Replace (or append) the ``<!-- section -->`` block of RESULTS.md."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n" + _RESULTS_INTRO
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


_RESULTS_INTRO = (
    "Written by the scripts in `benchmarks/` (see `benchmarks/README.md`); each script\n"
    "replaces its own section. Numbers are from one machine and one run: compare the\n"
    "ratios within a table, not absolute numbers across machines.\n"
)


# Where plots go instead of benchmarks/ when the run does not write results (--no-write).
_PLOTS_ELSEWHERE: list[Path] = []


def keep_results(write: bool) -> None:
    """``write=False`` (a ``--no-write`` run) sends the plots to a temporary directory,
    so a smoke run leaves the recorded PNGs next to RESULTS.md alone."""
    _PLOTS_ELSEWHERE.clear()
    if not write:
        _PLOTS_ELSEWHERE.append(Path(tempfile.mkdtemp(prefix="tieredcache-bench-plots-")))


def plot(spec: Mapping[str, Any], out: Path) -> str | None:
    """Draw a bar chart in the ``plot`` venv (matplotlib stays out of the project venv).

    ``spec``: ``{"title", "ylabel", "groups": [...], "series": {name: [values]}, "log": bool}``.
    Returns None on success, else why no plot was drawn.
    """
    try:
        python = ensure_venv("plot")
    except PeerError as exc:
        return str(exc)
    if _PLOTS_ELSEWHERE:
        out = _PLOTS_ELSEWHERE[0] / out.name
        print(f"plot (not kept: --no-write): {out}", file=sys.stderr)
    done = subprocess.run(
        [str(python), str(HERE / "_plot.py"), str(out)],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return (done.stderr or done.stdout).strip().splitlines()[-1]
    return None


def main() -> int:
    upgrade = "--upgrade" in sys.argv
    status = ensure_all(upgrade=upgrade)
    for name, state in status.items():
        print(f"{name}: {state}")
        if state == "ok":
            print("   ", versions(name))
    return 0 if all(s == "ok" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
