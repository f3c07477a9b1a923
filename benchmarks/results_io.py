"""What the result benchmarks share: running the real ``r2unet evaluate --json`` as a subprocess,
the sections of docs/RESULTS.md (who writes which, replacing one while keeping the others) and
the name of the CPU the numbers were measured on.

Imported by the scripts of this folder, which run as ``.venv/bin/python benchmarks/NAME.py`` (the
folder is then first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"
FINETUNE_HEADING = "## Fine-tuning on a new kind of image"  # written by hand from benchmarks/finetune_gain.py
TASKS_HEADING = "## Skin lesions (ISIC 2017) and lung fields (chest X-ray)"  # benchmarks/task_results.py
ROBUSTNESS_HEADING = "## Robustness (DRIVE test, transformed)"  # benchmarks/robustness.py
# the sections after the DRIVE part, which benchmarks/drive_results.py keeps when it rewrites the file
KEPT_HEADINGS = (FINETUNE_HEADING, TASKS_HEADING, ROBUSTNESS_HEADING)


def cli_evaluate(model: str | Path, images: Path, masks: Path, fov: Path | None = None, options: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> tuple[dict, float]:
    """``r2unet evaluate MODEL --images --masks [--fov] --json OPTIONS`` run from the repository
    root: its JSON result (``pooled``, ``mean``, ``images``, ``threshold``, ...) and the wall
    seconds per image of the whole command (start-up, reading, inference)."""
    command = [sys.executable, "-m", "src_models.cli", "evaluate", str(model), "--images", str(images),
               "--masks", str(masks), *(["--fov", str(fov)] if fov is not None else []), "--json", *options]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode:
        raise SystemExit(f"evaluate failed for {model} on {images}: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout)
    return result, (time.perf_counter() - start) / max(1, len(result["images"]))


def _section_span(text: str, heading: str) -> tuple[int, int] | None:
    """Start and end offsets in ``text`` of the section headed by the line ``heading`` (up to the
    next ``## `` heading or the end)."""
    found = ("\n" + text + "\n").find("\n" + heading + "\n")
    if found < 0:
        return None
    end = text.find("\n## ", found + len(heading))
    return found, (end + 1 if end >= 0 else len(text))


def section_body(text: str, heading: str) -> str | None:
    """The text of the section headed ``heading`` after its heading line, or None without one."""
    span = _section_span(text, heading)
    return None if span is None else text[span[0] + len(heading):span[1]].strip("\n")


def replace_section(text: str, heading: str, lines: Sequence[str]) -> str:
    """``text`` with the section headed ``heading`` replaced by ``heading`` + ``lines`` (appended
    at the end when absent); every other section stays as it is."""
    section = "\n".join([heading, "", *lines]).rstrip("\n") + "\n"
    span = _section_span(text, heading)
    if span is None:
        return text.rstrip("\n") + "\n\n" + section
    tail = text[span[1]:]
    return text[:span[0]] + section + ("\n" + tail if tail else "")


def kept_sections(text: str) -> str:
    """The part of ``text`` from the first of :data:`KEPT_HEADINGS` on ("" without one): what
    benchmarks/drive_results.py appends, unchanged, after the DRIVE part it rewrites."""
    starts = [span[0] for span in (_section_span(text, h) for h in KEPT_HEADINGS) if span is not None]
    return text[min(starts):] if starts else ""


def write_section(heading: str, lines: Sequence[str], results: Path = RESULTS) -> None:
    """Replace (or add) the section headed ``heading`` of ``results``, keeping the others; the file
    is replaced atomically."""
    from src_models.fileio import atomic_write

    text = results.read_text() if results.exists() else "# Results\n"
    new = replace_section(text, heading, lines)
    atomic_write(results, lambda tmp: Path(tmp).write_text(new), suffix=".md")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what :mod:`platform` knows)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as handle:
        cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    return cpu


def cpu_description() -> str:
    """CPU, instruction set (the machine's and the widest one torch's kernels use), core count and OS:
    ``AMD EPYC (x86_64, torch ISA AVX512), 2 logical CPUs; Linux 6.1``."""
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    return (f"{cpu_name()} ({platform.machine()}, torch ISA {isa}), {os.cpu_count()} logical CPUs; "
            f"{platform.system()} {platform.release()}")


def _init_file(command: str) -> Path | None:
    """The ``--init`` argument of a training command, when it names a file."""
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words[:-1]):
        if word == "--init" and Path(words[i + 1]).is_file():
            return Path(words[i + 1])
    return None


def _parent(provenance: dict, target: Path) -> dict | None:
    """The provenance of the checkpoint a run started from (``--init``): the file its command names,
    else the installed ``target``, whichever has the recorded ``parent_sha256``."""
    from src_models.checkpoint import load_checkpoint

    sha = provenance.get("parent_sha256")
    for path in (_init_file(provenance.get("command", "")), target):
        if sha and path is not None and path.is_file():
            checkpoint = load_checkpoint(path)
            if checkpoint.sha256 == sha:
                return {"name": checkpoint.name, **checkpoint.provenance}
    return None


def _step(name: str, command: str, wall_time_s: float) -> dict:
    return {"name": name, "command": command, "wall_time_s": wall_time_s}


def _same_run(a: dict, b: dict) -> bool:
    """Whether two provenances are one training run (an installed copy carries its run's command and time)."""
    return bool(a.get("command")) and a.get("command") == b.get("command") and a.get("created") == b.get("created")


def inherit_parent_command(provenance: dict, target: Path) -> dict:
    """``provenance`` of a run about to replace the installed ``target``, with the commands of the
    models it started from (``--init``), nearest first, as ``lineage`` (``parent_command``: the
    nearest): followed through the ``--init`` files and ``target`` while their SHA-256 matches and
    carried over from an ancestor that holds them, or from ``target`` when that is an install of
    the same run, of the run a parent file comes from (the raw file of the shipped model), or of
    a run from the same parent."""
    if "lineage" in provenance or not provenance.get("parent_sha256"):
        return provenance
    shipped: dict = {}
    if target.exists():
        from src_models.checkpoint import load_checkpoint

        shipped = load_checkpoint(target).provenance
    if shipped and _same_run(shipped, provenance) and _carried(shipped):  # installed again
        return _with_lineage(provenance, _carried(shipped))
    lineage, current = [], provenance
    while (parent := _parent(current, target)) is not None and len(lineage) < 20:
        lineage.append(_step(parent.get("name", ""), parent.get("command", ""), parent.get("wall_time_s", 0)))
        holder = parent if parent.get("lineage") or parent.get("parent_command") else shipped if shipped and _same_run(shipped, parent) else None
        if holder is not None:
            lineage += _carried(holder)
            break
        current = parent
    if not lineage and shipped.get("parent_sha256") == provenance["parent_sha256"]:
        lineage = _carried(shipped)
    return _with_lineage(provenance, lineage) if lineage else provenance


def _with_lineage(provenance: dict, lineage: list[dict]) -> dict:
    return {**provenance, "lineage": lineage, "parent_command": lineage[0]["command"], "parent_wall_time_s": lineage[0]["wall_time_s"]}


def _carried(provenance: dict) -> list[dict]:
    """The lineage a checkpoint holds (an install made before lineages: its parent's command only)."""
    if provenance.get("lineage"):
        return list(provenance["lineage"])
    if provenance.get("parent_command"):
        return [_step(provenance.get("parent", ""), provenance["parent_command"], provenance.get("parent_wall_time_s", 0))]
    return []


def parent_line(provenance: dict) -> str:
    """The docs' lines on the models a ``--init`` run started from (empty for a run from scratch)."""
    lines, name = [], provenance.get("parent", "")
    for i, step in enumerate(_carried(provenance)):
        lead = f"It started (`--init`) from {name}" if i == 0 else "That one started from its predecessor"
        lines.append(f"\n  {lead}, trained by `{step['command']}` ({step.get('wall_time_s', 0) / 60:.0f} min)")
    return "".join(lines)
