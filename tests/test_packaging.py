"""The Space's requirements and the local ones must not drift apart."""

from pathlib import Path

ROOT = Path(__file__).parents[1]


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


def test_merge_core_never_imports_gradio() -> None:
    for path in (ROOT / "merge_core").glob("*.py"):
        text = path.read_text()
        assert "import gradio" not in text and "from gradio" not in text, path.name
