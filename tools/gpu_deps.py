"""What the GPU check (tools/gpu_check.sh) needs beyond the GPU machine's image, carried as wheels.

The machine has no internet and takes at most 64 MiB of wheels and files along; its image already
holds torch, transformers and most of the scientific stack (tools/gpu_image_packages.txt). This
file names the distributions the check imports that the image lacks (``ROOTS``), pins them and
what they need at this environment's versions (tools/gpu_wheels.txt, read by tools/gpu_wheels.sh),
and proves the pin right without a GPU:

    python tools/gpu_deps.py pin      rewrite tools/gpu_wheels.txt
    python tools/gpu_deps.py check    import everything the check imports, in a process where only the
                                      image's and the pinned distributions can be imported (CI runs it)

``check`` blocks every import whose distribution is neither on the image nor pinned, as the GPU
machine would fail it, then imports the GPU test modules, every module of the package (but the
vLLM worker extension, which runs inside vLLM) and what the check's subprocesses import; an import
that is optional where it is made (``try: import wandb``) may fail, as it does there.
"""
from __future__ import annotations

import importlib
import importlib.abc
import pkgutil
import re
import sys
import traceback
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
IMAGE_FILE, PIN_FILE = TOOLS / "gpu_image_packages.txt", TOOLS / "gpu_wheels.txt"
# What the GPU check imports that the image lacks (their own needs follow from their metadata).
ROOTS = ("megatron-core", "pydantic", "fastapi", "uvicorn", "tenacity", "math-verify")
GPU_TEST_MODULES = ("tests.test_models_gpu", "tests.test_gpu_training", "tests.test_sglang_real")
SUBPROCESS_IMPORTS = ("uvicorn", "megatron_opsd.cli")  # the stand-in server the sync check starts
NOT_IMPORTED_HERE = ("megatron_opsd.rollout.vllm.worker",)  # runs inside a vLLM server
TARGET = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _listed(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def image() -> set[str]:
    return {normalize(name) for name in _listed(IMAGE_FILE)}


def pinned() -> dict[str, str]:
    return {normalize(Requirement(line).name): str(Requirement(line).specifier).removeprefix("==")
            for line in _listed(PIN_FILE)}


def closure(roots: tuple[str, ...], skip: set[str]) -> dict[str, str]:
    """``roots`` and everything they require on the GPU machine's Python, at this environment's
    installed versions, leaving out ``skip`` (what the image has) and what that requires."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = normalize(todo.pop())
        if name in found or name in skip:
            continue
        dist = metadata.distribution(name)
        found[name] = dist.version
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate(TARGET):
                todo.append(requirement.name)
    return found


def pin() -> None:
    wanted = closure(ROOTS, image())
    header = ("# Wheels tools/gpu_wheels.sh fetches for the GPU check (Python 3.12): what it needs beyond the\n"
              "# GPU image. Written by `python tools/gpu_deps.py pin`; CI checks it (`python tools/gpu_deps.py check`).\n")
    PIN_FILE.write_text(header + "".join(f"{name}=={version}\n" for name, version in sorted(wanted.items())))
    print(f"pinned {len(wanted)} distributions in {PIN_FILE.relative_to(REPO)}")


class _OnlyTheGPUMachines(importlib.abc.MetaPathFinder):
    """Refuses a top-level module whose distribution the GPU machine would not have, unless a
    distribution of the image imports it: the image's own versions bring what they need, which
    this environment's versions of them may not (a newer huggingface-hub needs httpx2)."""

    def __init__(self, image: set[str], pinned: set[str]):
        self.image, self.allowed = image, image | pinned | {"megatron-opsd"}
        self.owners = metadata.packages_distributions()
        self.refused: set[str] = set()
        self.brought: set[str] = set()  # let in for an image package (and what those import in turn)

    def _dists(self, module: str) -> set[str]:
        return {normalize(d) for d in self.owners.get(module.partition(".")[0], ())}

    def find_spec(self, fullname, path, target=None):
        if "." in fullname:  # a submodule: its package was let in already
            return
        owners = self._dists(fullname)
        if not owners or owners & self.allowed:
            return
        importer = _importer().partition(".")[0]
        if self._dists(importer) & self.image or importer in self.brought:  # the image's versions bring it
            self.brought.add(fullname)
            return
        self.refused.add(f"{fullname} ({', '.join(sorted(owners))})")
        raise ModuleNotFoundError(f"{fullname} is not on the GPU machine: neither on its image nor in {PIN_FILE.name}")


def _importer() -> str:
    """The module whose import statement is being run (the first frame outside the import system)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


def _package_modules() -> list[str]:
    import megatron_opsd

    names = [m.name for m in pkgutil.walk_packages(megatron_opsd.__path__, "megatron_opsd.")]
    return [n for n in names if not n.startswith(NOT_IMPORTED_HERE)]


def check() -> int:
    problems = []
    expected = closure(ROOTS, image())
    if expected != pinned():
        problems.append(f"{PIN_FILE.name} is not the pin of ROOTS at this environment's versions: run "
                        f"`python tools/gpu_deps.py pin` (expected {expected})")
    finder = _OnlyTheGPUMachines(image(), set(pinned()))
    sys.meta_path.insert(0, finder)
    sys.path.insert(0, str(REPO))
    modules = [*GPU_TEST_MODULES, *_package_modules(), *SUBPROCESS_IMPORTS]
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - each failure is listed
            problems.append(f"import {name} fails on the GPU machine:\n{traceback.format_exc(limit=3)}")
    sys.meta_path.remove(finder)
    print(f"gpu_deps: {len(modules)} modules imported with the image's {len(image())} and {len(pinned())} pinned "
          f"distributions; optional imports refused as there: {', '.join(sorted(finder.refused)) or 'none'}")
    for problem in problems:
        print(f"gpu_deps: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    commands = {"pin": lambda: pin() or 0, "check": check}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python {Path(__file__).name} {{{','.join(commands)}}}")
    sys.exit(commands[sys.argv[1]]())
