"""The console script: check-dataset, and the entry point itself."""

from __future__ import annotations

import json
import subprocess
import sys

from lightning_threadsafe.cli import main


def test_check_dataset_flags_an_unsafe_dataset(capsys):
    code = main(["check-dataset", "_helpers.GlobalRNGDataset", "--threads", "4", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["safe"] is False and "numpy" in report["global_rng"]
    assert report["differing_indices"]


def test_check_dataset_passes_a_safe_dataset(capsys):
    assert main(["check-dataset", "_helpers.SeededDataset", "--init_args", "{}"]) == 0
    assert "safe" in capsys.readouterr().out.lower()


def test_check_dataset_rejects_bad_arguments(capsys):
    for argv, needle in ((["check-dataset", "nodots"], "class_path='nodots'"),
                         (["check-dataset", "_helpers.SeededDataset", "--init_args", "[1]"],
                          "--init_args")):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 2
        else:  # pragma: no cover - the parser must exit
            raise AssertionError(f"{argv} did not fail")
        assert needle in capsys.readouterr().err


def test_console_script_is_installed_and_answers_help():
    proc = subprocess.run([sys.executable, "-m", "lightning_threadsafe.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fit" in proc.stdout and "validate" in proc.stdout
