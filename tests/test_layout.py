"""The layering: imports point one way, vae <- dalle_mini_impl <- train, sample, and inside the library
from the parts of the pipeline that stand alone to the ones that join them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what each top-level package may import from the project's own packages
ALLOWED = {
    "vae": set(),
    "dalle_mini_impl": {"vae"},
    "train": {"vae", "dalle_mini_impl"},
    "sample": {"vae", "dalle_mini_impl"},
}
OWN = set(ALLOWED)
# third-party modules vae/ may use: it stands alone
VAE_THIRD_PARTY = {"torch", "einops", "numpy", "safetensors"}
# the one optional module one vae/ file imports where it is needed: the converter reads taming's YAML configs
VAE_OPTIONAL = {"vae/convert.py": {"yaml"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _own_imports(path: Path, root: Path = ROOT) -> set[str]:
    """The `dalle_mini_impl` subpackages or top-level modules that a library file imports, relative or not."""
    module = path.relative_to(root).with_suffix("").parts
    package = module if module[-1] == "__init__" else module[:-1]
    package = package[:-1] if package[-1] == "__init__" else package
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            target = base + (node.module.split(".") if node.module else [])
            if node.module is None:  # from . import x: each name is a module of that package
                targets = [target + [a.name] for a in node.names]
            else:
                targets = [target]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".") for a in node.names]
        else:
            continue
        names |= {t[1] for t in targets if len(t) > 1 and t[0] == "dalle_mini_impl"}
    return names


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    files = _files(package)
    assert files, f"{package}/ has no Python files"
    for path in files:
        wrong = (_imports(path) & OWN) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}, against the layering"


# inside the library: what each part may import besides itself (the pipeline picture, bottom up)
LIBRARY = {
    "errors": set(),
    "files": {"errors"},  # write_atomic, which every writer uses; the checks of where a user asks to write
    "config": {"errors", "files"},
    "text": {"errors", "files", "config"},
    "shapes": {"errors", "files", "config"},
    "model": {"errors", "files", "config"},
    "data": {"errors", "files", "config", "shapes"},
    "clip": {"errors", "files", "config", "data"},
    # shapes: the caption grammar's edits
    "pipeline": {"errors", "files", "config", "text", "shapes", "data", "model", "clip"},
    "eval": {"errors", "files", "config", "text", "data", "shapes", "model", "clip", "pipeline"},
    "bench": {"errors", "files", "config", "data", "model", "pipeline"},
}


def test_every_part_of_the_library_is_layered():
    parts = {p.stem if p.is_file() else p.name for p in (ROOT / "dalle_mini_impl").iterdir()}
    parts = {p for p in parts if not p.startswith("__") and p != "assets"}
    assert parts == set(LIBRARY), "a new part of dalle_mini_impl needs its place in LIBRARY"


@pytest.mark.parametrize("part", sorted(LIBRARY))
def test_library_imports_point_down_the_pipeline(part):
    path = ROOT / "dalle_mini_impl" / part
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    for file in files:
        if file.name == "__main__.py":  # a command-line shell may join any parts
            continue
        wrong = _own_imports(file) - LIBRARY[part] - {part}
        assert not wrong, f"{file.relative_to(ROOT)} imports dalle_mini_impl.{sorted(wrong)}, against the layering"


def test_vae_stands_alone():
    import sys

    stdlib = set(sys.stdlib_module_names)
    for path in _files("vae"):
        optional = VAE_OPTIONAL.get(path.relative_to(ROOT).as_posix(), set())
        extra = _imports(path) - stdlib - VAE_THIRD_PARTY - optional - {"vae", "__future__"}
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}; vae/ may use only torch, einops, numpy"


def test_checker_sees_a_wrong_edge(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("from train.loop import run\nimport sample\n")
    assert _imports(bad) & OWN == {"train", "sample"}


def test_library_checker_resolves_relative_imports(tmp_path):
    fake = tmp_path / "dalle_mini_impl" / "model"
    fake.mkdir(parents=True)
    (fake / "m.py").write_text(
        "from ..pipeline.bundle import x\nfrom .generate import y\nfrom .. import config\n"
        "import dalle_mini_impl.clip.uses\nfrom dalle_mini_impl.data.images import z\n"
    )
    assert _own_imports(fake / "m.py", tmp_path) == {"pipeline", "model", "config", "clip", "data"}


def test_the_public_api_resolves_and_importing_the_package_stays_cheap():
    import subprocess
    import sys

    import dalle_mini_impl

    for name in dalle_mini_impl.__all__:
        assert getattr(dalle_mini_impl, name) is not None, name
    assert dalle_mini_impl.Pipeline.__module__ == "dalle_mini_impl.pipeline.pipeline"
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        dalle_mini_impl.Nope  # noqa: B018
    probe = "import sys, dalle_mini_impl; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"  # names are imported on first use
