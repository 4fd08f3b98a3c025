"""The README's quick start runs exactly as printed, and CI runs the README's test command."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
MARKER = "<!-- quickstart: examples/quickstart.py -->"


def quickstart_block() -> str:
    """The ```python block right after the quick-start marker."""
    assert MARKER in README, "README lost its quick-start marker"
    m = re.match(r"\s*```python\n(.*?)^```", README.split(MARKER, 1)[1], re.S | re.M)
    assert m, "no ```python block after the quick-start marker"
    return m.group(1)


def test_readme_quickstart_is_the_example_file():
    assert quickstart_block() == (ROOT / "examples" / "quickstart.py").read_text()


def test_readme_quickstart_runs_as_printed(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart_block())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("DWDP_COMM_BACKEND", None)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path,
                       env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    for r in range(4):
        assert f"rank {r} (sim): owns 4 experts, sees [16, 64, 64]: every expert correct" in lines, p.stdout
    assert lines[-1].startswith("quickstart passed")


def test_readme_points_at_docs_that_exist_or_are_announced():
    assert "dwdp_comm.testing.launch" in README and "torchrun" in README
    assert "docs/integration.md" in README  # Hugging Face section (the doc is written on another branch)


TEST_CMD = "python3 -m pytest -q -n 2 --dist loadfile"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmds = re.findall(r"^python3 -m pytest[^\n]*$", README, re.M)
    # two workers, one test file each at a time (a module's fixture runs once): the CI machine's 2 cores
    assert test_cmds and set(test_cmds) == {TEST_CMD}, test_cmds
    assert re.search(r"(^|&& )" + re.escape(TEST_CMD) + r"\s*$", ci, re.M), ci
    assert 'python3 -m pip install -e ".[test]"' in ci and 'python3 -m pip install -e ".[test]"' in README


def test_readme_benchmark_commands_exist():
    assert "\ndwdp-bench contention " in README and "python3 -m dwdp_comm.bench contention" in README
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dwdp-bench = "dwdp_comm.bench.cli:main"' in pyproject
    assert (ROOT / "dwdp_comm" / "bench" / "__main__.py").is_file()


def _design_map() -> str:
    text = (ROOT / "docs" / "design.md").read_text()
    assert "## Map of the repository" in text, "docs/design.md lost its map"
    return text.split("## Map of the repository", 1)[1].split("\n## ", 1)[0]


def test_design_map_names_every_file_and_only_files_that_exist():
    """docs/design.md's map stays true: every file of the library, the tests, perf/ and examples/ is
    named in it (library files by their path inside dwdp_comm/, the others by their file name), and
    every file it names exists."""
    listed = set(re.findall(r"`([A-Za-z0-9_./]+\.(?:py|sh|json))`", _design_map()))
    files = [p for p in (ROOT / "dwdp_comm").rglob("*") if p.suffix in (".py", ".json")]
    expected = {str(p.relative_to(ROOT / "dwdp_comm")) for p in files}
    for folder in ("tests", "perf", "examples"):
        expected |= {p.name for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh")
                     and "results" not in p.parts and not (folder == "tests" and p.name == "__init__.py")}
    assert not expected - listed, f"files missing from docs/design.md's map: {sorted(expected - listed)}"
    everything = {str(p.relative_to(ROOT / "dwdp_comm")) for p in files} | {"docs/gen_api.py", "docs/design.md"} | {
        p.name for folder in ("dwdp_comm", "tests", "perf", "examples", "docs") for p in (ROOT / folder).rglob("*")}
    named_files = {n for n in listed if "/" not in n or not n.startswith(("docs/", "tests/", "perf/", "examples/"))}
    assert not named_files - everything, f"docs/design.md's map names files that do not exist: {sorted(named_files - everything)}"
