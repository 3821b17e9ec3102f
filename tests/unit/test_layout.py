"""Guards on the package layout, the CLI's import weight and the layering contract."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ["pyspark", "ray", "torch", "mlflow", "xgboost", "pandas", "dagster"]


def test_platform_folder_is_not_a_package():
    # platform/__init__.py would shadow the standard library's `platform` module.
    assert not (REPO / "platform" / "__init__.py").exists()


def test_help_lists_command_groups_without_heavy_imports():
    code = (
        "import sys, json\n"
        "from lakeray.cli.main import cli\n"
        "try:\n    cli.main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    help_text, heavy_line = out.rsplit("\n", 2)[0], out.strip().splitlines()[-1]
    for group in ["demo", "setup", "config", "data", "features", "train", "serve"]:
        assert f"  {group} " in help_text
    assert json.loads(heavy_line) == []


def test_console_script_help_exits_zero():
    exe = Path(sys.executable).parent / "lakeray"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Commands:" in result.stdout


def test_import_layering_contract_is_kept():
    exe = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(exe)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout
