"""The layering of DESIGN.md: imports point one way, vae <- dalle_mini_impl <- train, sample."""

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


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
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


def test_vae_stands_alone():
    import sys

    stdlib = set(sys.stdlib_module_names)
    for path in _files("vae"):
        extra = _imports(path) - stdlib - VAE_THIRD_PARTY - {"vae", "__future__"}
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}; vae/ may use only torch, einops, numpy"


def test_checker_sees_a_wrong_edge(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("from train.loop import run\nimport sample\n")
    assert _imports(bad) & OWN == {"train", "sample"}
