"""What `import trl_nspo` and `trl-nspo --help` cost and print, measured in fresh interpreters."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).parents[1]


def run_python(*arguments: str) -> subprocess.CompletedProcess:
    """`python ARGUMENTS` in a fresh interpreter that imports this checkout's `trl_nspo`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, *arguments], capture_output=True, text=True, env=env, cwd=REPOSITORY, check=True
    )


@pytest.mark.parametrize(
    "arguments",
    [
        ["-c", "import trl_nspo.nspo_trainer, trl_nspo.demo"],
        ["-m", "trl_nspo.cli", "calibrate", "--help"],
    ],
    ids=["import", "calibrate-help"],
)
def test_bitsandbytes_kernel_notice_is_not_printed(arguments):
    result = run_python(*arguments)
    assert "gemm_4bit_forward" not in result.stdout + result.stderr


HEAVY_MODULES = ("torch", "transformers", "trl", "peft", "bitsandbytes")


def test_import_and_usage_load_no_heavy_module():
    script = (
        "import sys, trl_nspo\n"
        "from trl_nspo.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print([name for name in {HEAVY_MODULES!r} if name in sys.modules])"
    )
    result = run_python("-c", script)
    assert result.stdout.strip() == "[]"
    assert "calibrate" in result.stderr


def test_every_public_name_is_exported_lazily():
    import trl_nspo

    for name in trl_nspo.__all__:
        assert getattr(trl_nspo, name).__name__ == name
        assert name in dir(trl_nspo)
    with pytest.raises(AttributeError, match="has no attribute 'NSPOTrainerr'"):
        trl_nspo.NSPOTrainerr  # noqa: B018
