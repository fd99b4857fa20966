"""The fingerprint of what the lock was resolved from, and the check that the lock still matches it.

    python3 requirements/inputs.py hash            # print the fingerprint of the current inputs
    python3 requirements/inputs.py check           # exit 1, naming the fix, when requirements/lock.txt is stale
    python requirements/inputs.py verify-env       # in an environment: every locked pin installed, exactly
    python requirements/inputs.py verify-env --missing-ok   # only report compactvl's missing requirements
    python requirements/inputs.py diff             # installed versions that differ from the lock
    python3 requirements/inputs.py lowest NAME     # the lower bound pyproject.toml declares for NAME

Inputs: pyproject.toml's [project] dependencies and optional-dependencies (not the rest of the file, so editing the
description does not invalidate the lock), requirements/weights.in, requirements/lmms.in and the CPU torch spec that ./run installs first
(argument --torch, default: the TORCH_CPU line of ./run). The lock records it on a line ``# inputs: <fingerprint>``.
Standard library only: it runs before any environment exists.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ("requirements/lock.txt", "requirements/weights.txt", "requirements/lmms.txt")


def _torch_spec() -> str:
    m = re.search(r'^TORCH_CPU="?([^"\n]+)"?', (ROOT / "run").read_text(), re.M)
    return m.group(1).strip() if m else ""


def _dependencies() -> dict:
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # 3.10: the whole file stands in for its dependency tables
        return {"pyproject.toml": text}
    project = tomllib.loads(text).get("project", {})
    return {"dependencies": project.get("dependencies", []),
            "optional-dependencies": project.get("optional-dependencies", {})}


def _lines(name: str) -> list[str]:
    return [ln.strip() for ln in (ROOT / name).read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def fingerprint() -> str:
    blob = json.dumps({"project": _dependencies(), "weights": _lines("requirements/weights.in"),
                       "lmms": _lines("requirements/lmms.in"), "torch": _torch_spec()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recorded(lock: Path) -> str | None:
    if not lock.is_file():
        return None
    m = re.search(r"^# inputs: ([0-9a-f]+)$", lock.read_text(), re.M)
    return m.group(1) if m else None


def check() -> int:
    want = fingerprint()
    for name in LOCKS:
        got = recorded(ROOT / name)
        if got != want:
            why = "is missing" if not (ROOT / name).is_file() else (
                "has no '# inputs:' line" if got is None else
                "was resolved from other dependencies than pyproject.toml / requirements/weights.in / lmms.in / ./run's "
                "TORCH_CPU declare now")
            print(f"[compactvl] {name} {why} (lock {got}, inputs {want}). Regenerate the lock with "
                  f"'./run lock' (keeps the other pins) or './run lock --upgrade' (newest releases), run "
                  f"'./run test', and commit requirements/.", file=sys.stderr)
            return 1
    return 0


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_pins(*names: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for name in names or LOCKS:
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s\\;]+)", (ROOT / name).read_text(), re.M):
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    from importlib import metadata

    return {_norm(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def diff() -> int:
    have, pins = installed(), locked_pins()
    rows = [(n, v, have.get(n, "(missing)")) for n, v in sorted(pins.items()) if have.get(n) != v]
    for name, want, got in rows:
        print(f"  {name:<32} locked {want:<16} installed {got}")
    print(f"  {len(rows)} of {len(pins)} locked packages differ")
    return 1 if rows else 0


def missing_requirements() -> list[str]:
    """compactvl's core requirements (pyproject [project] dependencies) that the environment does not satisfy."""
    try:
        from packaging.requirements import Requirement
    except ModuleNotFoundError:
        return []
    deps = _dependencies().get("dependencies", [])
    have, out = installed(), []
    for spec in deps:
        req = Requirement(spec)
        v = have.get(_norm(req.name))
        if v is None or (req.specifier and not req.specifier.contains(v, prereleases=True)):
            out.append(f"{spec} (installed: {v or 'none'})")
    return out


def verify_env(missing_ok: bool) -> int:
    missing = missing_requirements()
    if missing_ok:
        if missing:
            print("[compactvl] this environment lacks: " + "; ".join(missing) + ". Install them (on a machine "
                  "without PyPI, carry their wheels), or use ./run setup without COMPACTVL_SKIP_TORCH",
                  file=sys.stderr)
        return 0
    have, pins = installed(), locked_pins()
    wrong = [f"{n}=={v} (installed: {have.get(n, 'none')})" for n, v in sorted(pins.items()) if have.get(n) != v]
    if wrong or missing:
        print("[compactvl] the environment does not match the lock: " + "; ".join(wrong + missing) +
              ". Remove the environment directory and run ./run setup again", file=sys.stderr)
        return 1
    return 0


def lowest(name: str) -> str:
    for spec in _dependencies().get("dependencies", []):
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*(.*)", spec)
        if m and _norm(m.group(1)) == _norm(name):
            low = re.search(r">=\s*([^,\s]+)", m.group(2))
            if low:
                return low.group(1)
    raise SystemExit(f"pyproject.toml declares no lower bound for {name}")


if __name__ == "__main__":
    cmd, args = (sys.argv[1] if len(sys.argv) > 1 else "check"), sys.argv[2:]
    if cmd == "hash":
        print(fingerprint())
    elif cmd == "check":
        sys.exit(check())
    elif cmd == "verify-env":
        sys.exit(verify_env("--missing-ok" in args))
    elif cmd == "diff":
        sys.exit(diff())
    elif cmd == "lowest" and len(args) == 1:
        print(lowest(args[0]))
    else:
        print("usage: python requirements/inputs.py hash | check | verify-env [--missing-ok] | diff | lowest NAME",
              file=sys.stderr)
        sys.exit(2)
