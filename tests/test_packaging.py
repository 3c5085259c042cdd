"""The Space's requirements and the local ones must not drift apart; CI runs what the README says."""

from pathlib import Path

ROOT = Path(__file__).parents[1]
README_TEST_COMMAND = "bash scripts/install.sh --with-browser && python -m pytest -q"


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pkg = line.split("==")[0].split(">=")[0].split("[")[0].lower()
            pins[pkg] = line
    return pins


def test_space_and_dev_requirements_agree_except_torch() -> None:
    space, dev = _pins("requirements.txt"), _pins("requirements-dev.txt")
    for pkg, line in space.items():
        if pkg != "torch":
            assert dev.get(pkg) == line, f"{pkg}: requirements.txt has {line!r}, requirements-dev.txt {dev.get(pkg)!r}"
    major_minor = tuple(int(x) for x in space["torch"].split("==")[1].split(".")[:2])
    assert (2, 8) <= major_minor <= (2, 11), "ZeroGPU supports torch 2.8-2.11 only"


def test_test_tools_are_pinned_for_local_use_only() -> None:
    test_only = (ROOT / "requirements-dev.txt").read_text().split("# test-only", 1)[1]
    assert "ruff==" in test_only and "ruff" not in _pins("requirements.txt")


def test_ci_lints_after_installing_and_before_the_readme_test_command() -> None:
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert README_TEST_COMMAND in (ROOT / "README.md").read_text()
    assert ci[-1] == README_TEST_COMMAND
    install, check, fmt = (
        ci.index(c) for c in ("bash scripts/install.sh --with-browser", "ruff check .", "ruff format --check .")
    )
    assert install < check < fmt < len(ci) - 1


def test_merge_core_never_imports_gradio() -> None:
    paths = list((ROOT / "merge_core").rglob("*.py"))
    assert len(paths) > 10
    for path in paths:
        text = path.read_text()
        assert "import gradio" not in text and "from gradio" not in text, path.name
