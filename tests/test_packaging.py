"""Packaging and architecture: one `clipline` namespace, and imports that form a DAG."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What each top-level folder may import from clipline (DESIGN.md, "One direction of flow").
ALLOWED = {
    "data": set(),
    "pretrain": {"data"},
    "eval": {"data"},
    "launch": {"data", "pretrain", "eval", "launch"},
}
# Libraries a folder must not import: data/ knows no model (it gets a PreprocessConfig of
# plain numbers and a tokenize callable from launch/, built there from the model).
FORBIDDEN = {"data": {"open_clip", "open_clip_train", "timm"}}


def _imported_modules(path: Path) -> set[str]:
    """Every module an import in ``path`` names: module level or inside a function, by
    ``import``/``from`` or by ``importlib.import_module``/``__import__`` with a literal."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def _clipline_imports(path: Path) -> set[str]:
    found = set()
    for name in _imported_modules(path):
        parts = name.split(".")
        if parts[0] == "clipline" and len(parts) > 1:
            found.add(parts[1])
    return found


def _forbidden_imports(path: Path, package: str) -> set[str]:
    return {n for n in _imported_modules(path) if n.split(".")[0] in FORBIDDEN.get(package, ())}


def test_imports_form_the_documented_dag():
    for package, allowed in ALLOWED.items():
        for path in (REPO / package).rglob("*.py"):
            bad = _clipline_imports(path) - allowed - {package}
            assert not bad, f"{path.relative_to(REPO)} imports clipline.{bad}; allowed: {allowed}"
            bad = _forbidden_imports(path, package)
            assert not bad, (
                f"{path.relative_to(REPO)} imports {sorted(bad)}; {package}/ may not import "
                f"{sorted(FORBIDDEN[package])}"
            )


def test_the_dag_check_sees_function_local_and_dynamic_imports(tmp_path):
    # What data/ used to do (a tokenizer imported on demand), and the other spellings.
    for source in [
        "def f():\n    from open_clip.tokenizer import SimpleTokenizer\n",
        "import timm.data\n",
        "def g():\n    import open_clip\n",
        "import importlib\nimportlib.import_module('open_clip')\n",
        "__import__('timm')\n",
    ]:
        path = tmp_path / "m.py"
        path.write_text(source)
        assert _forbidden_imports(path, "data"), source
    path.write_text("from .decode import Decoder\nimport torchvision\n")
    assert not _forbidden_imports(path, "data")


def test_wheel_installs_only_the_clipline_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("clipline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"clipline"}, top
    for expected in [
        "clipline/__main__.py",
        "clipline/data/stream.py",
        "clipline/eval/zeroshot.py",
        "clipline/pretrain/loop.py",
        "clipline/launch/cli.py",
        "clipline/launch/recipes/demo.toml",
        "clipline/pretrain/model_configs/tiny.json",
    ]:
        assert expected in names, expected
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "clipline = clipline.launch.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_python_dash_m_clipline():
    res = subprocess.run(
        [sys.executable, "-m", "clipline", "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0
    for sub in ["shards", "pretrain", "eval", "export", "embed", "search", "demo"]:
        assert sub in res.stdout


def test_export_formats_do_not_import_each_other():
    """pretrain/export.py and its format modules imported each other in a circle; now the
    formats import only export_base, and export.py imports the formats (to register them)."""
    formats = {p.stem for p in (REPO / "pretrain").glob("export_*.py")} - {"export_base"}
    assert formats == {"export_clipline", "export_open_clip", "export_hf", "export_onnx"}
    for path in (REPO / "pretrain").glob("export*.py"):
        tree = ast.parse(path.read_text())
        names = {
            n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.Import | ast.ImportFrom)
            for a in (n.names if isinstance(n, ast.Import) else [None])
        }
        names |= {
            f"clipline.pretrain.{a.name}"
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "clipline.pretrain"
            for a in n.names
        }
        imported = {
            m.rsplit(".", 1)[-1] for m in names if m and m.startswith("clipline.pretrain.export")
        }
        if path.stem == "export":
            assert imported == formats | {"export_base"}, imported
        else:
            assert imported <= {"export_base"}, f"{path.name} imports {imported - {'export_base'}}"


MAX_LINES = 600  # a file a newcomer can read in one sitting (issue 12)


def test_no_source_file_exceeds_the_size_limit():
    """Files grow one feature at a time; a limit checked in CI keeps them single-concern."""
    long = {
        str(p.relative_to(REPO)): n
        for part in ALLOWED
        for p in sorted((REPO / part).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these by concern (over {MAX_LINES} lines): {long}"
