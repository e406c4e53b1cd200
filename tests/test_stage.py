"""The stage runner behind every Snakemake script: one-line errors and exit codes, all in the rule's log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from duplus.errors import DataError
from duplus.stage import run_stage


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


def test_a_library_error_is_one_line_in_the_log_and_exit_1(tmp_path):
    log = tmp_path / "stage.log"

    def fails():
        raise DataError("case x: label missing")

    with pytest.raises(SystemExit) as stopped:
        run_stage("preprocess", fails, log_path=str(log))
    assert stopped.value.code == 1
    text = log.read_text(encoding="utf-8")
    assert "stage preprocess failed: case x: label missing" in text and "Traceback" not in text


def test_an_unexpected_error_reaches_the_rules_log_with_its_traceback(tmp_path):
    log = tmp_path / "stage.log"

    def crashes():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(SystemExit) as stopped:
        run_stage("universal_pretrain", crashes, log_path=str(log))
    assert stopped.value.code == 1
    text = log.read_text(encoding="utf-8")
    assert "unexpected error" in text and "Traceback" in text and "CUDA out of memory" in text


def test_a_finished_stage_returns_its_result(tmp_path):
    assert run_stage("report", lambda value: value * 2, log_path=str(tmp_path / "s.log"), value=21) == 42


def test_an_interrupted_training_exits_143_so_snakemake_sees_a_preempted_job(tmp_path):
    from duplus.errors import TrainingInterrupted

    class StoppedAtStep(TrainingInterrupted):
        pass

    for error in (TrainingInterrupted, StoppedAtStep):
        def stops(error=error):
            raise error("stopped at step 2 of 6; checkpoint written")

        with pytest.raises(SystemExit) as stopped:
            run_stage("universal_pretrain", stops, log_path=str(tmp_path / "s.log"))
        assert stopped.value.code == 143


def test_every_error_type_of_the_package_is_declared_in_errors():
    """One place for the error types: no module of the package defines a public exception of its own."""
    import ast

    import duplus

    package = Path(duplus.__file__).parent
    own = []
    for path in package.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and \
                    any(getattr(base, "id", "").endswith(("Error", "Exception", "Interrupted", "Diverged"))
                        for base in node.bases):
                own.append(f"{path.relative_to(package)}:{node.name}")
    assert own == []
