"""Every case of the bad-input corpus (tests/bad_inputs.py) fails cleanly, and
docs/robustness.md lists every case."""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_inputs import CASES, FRESH_PROCESS, ROOT, Case, run_case


@pytest.fixture
def good(tiny_data: Path) -> Path:
    return tiny_data


def test_corpus_is_large_and_unique() -> None:
    names = [case.name for case in CASES]
    assert len(names) >= 25
    assert len(set(names)) == len(names)


def test_fresh_process_cases_exist() -> None:
    assert set(FRESH_PROCESS) <= {case.name for case in CASES}


RUNS = [(case, False) for case in CASES] + [
    (case, True) for case in CASES if case.name in FRESH_PROCESS
]


@pytest.mark.parametrize(
    ("case", "fresh"),
    RUNS,
    ids=[case.name + ("-fresh-process" if fresh else "") for case, fresh in RUNS],
)
def test_bad_input_fails_cleanly(case: Case, fresh: bool, good: Path, tmp_path: Path) -> None:
    outcome = run_case(case, tmp_path, good, fresh)
    lines = outcome.stderr.strip().splitlines()
    assert outcome.returncode == 2, outcome.stderr
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("cvxmri: error:")
    assert case.expected in lines[0], lines[0]
    assert "Traceback" not in outcome.stderr
    assert not outcome.payload_ran
    assert not outcome.out_exists


def test_robustness_doc_lists_every_case() -> None:
    doc = (ROOT / "docs" / "robustness.md").read_text()
    for case in CASES:
        assert f"| {case.name} |" in doc, case.name
