"""``benchmarks/_harness.py``: the fresh-interpreter JSON protocol, medians and the atomic result file."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def harness(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _harness

    return _harness


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_run_child_returns_the_last_json_line_of_a_fresh_interpreter(harness, tmp_path):
    child = _script(tmp_path, """
        import json, os, sys
        print("loading...")
        print(json.dumps({"first": True}))
        print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "flag": os.environ.get("HARNESS_FLAG")}))
        print("done")
    """)
    result = harness.run_child(child, ["--a", "1"], env={"HARNESS_FLAG": "on"})
    assert result["argv"] == ["--a", "1"] and result["flag"] == "on"
    assert result["pid"] != os.getpid()


def test_run_child_reads_only_lines_with_the_prefix(harness, tmp_path):
    child = _script(tmp_path, """
        print('RESULT {"n": 1}')
        print('{"n": 2}')
    """)
    assert harness.run_child(child, [], prefix="RESULT ") == {"n": 1}


def test_a_child_that_prints_no_json_raises_a_clear_error(harness, tmp_path):
    child = _script(tmp_path, 'print("no numbers today")\n')
    with pytest.raises(harness.ChildError, match=r"(?s)child.py --x printed no JSON line.*no numbers today"):
        harness.run_child(child, ["--x"])


def test_a_failing_child_raises_with_the_end_of_its_stderr(harness, tmp_path):
    child = _script(tmp_path, """
        import sys
        print('{"n": 1}')
        sys.exit("out of memory in the child")
    """)
    with pytest.raises(harness.ChildError, match=r"failed with status 1; its stderr ends with:\nout of memory"):
        harness.run_child(child, [])


def test_medians_over_repeats_per_side(harness):
    runs = {"ours": [{"s": 3.0, "mb": 1}, {"s": 1.0, "mb": 5}, {"s": 2.0, "mb": 4}], "theirs": [{"s": 4.0, "mb": 2}]}
    assert harness.medians(runs, ("s", "mb")) == {"ours": {"s": 2.0, "mb": 4}, "theirs": {"s": 4.0, "mb": 2}}
    assert harness.median_of(runs["ours"][:2], "s") == 2.0


def test_write_result_is_atomic_and_says_where(harness, tmp_path, capsys):
    out = tmp_path / "results" / "bench.json"
    payload = {"benchmark": "x", "rows": [1.5, 2]}
    assert harness.write_result(out, payload) == out
    assert json.loads(out.read_text()) == payload
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json"]  # no temporary file left behind
    assert capsys.readouterr().out == f"wrote {out}\n"


def test_git_head_is_a_commit_or_empty(harness):
    assert re.fullmatch(r"([0-9a-f]{40})?", harness.git_head())


def test_cpu_header_names_the_cores_and_flags(harness):
    assert harness.cpu_header(["avx2", "fma"]) == f"CPU: {os.cpu_count()} cores, flags avx2 fma"


def test_extras_present_names_exactly_the_installed_ones(harness, tmp_path, monkeypatch):
    (tmp_path / "qlk_extra_here").mkdir()
    (tmp_path / "qlk_extra_here" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(harness, "IMPORTED_IF_PRESENT", ("qlk_extra_missing", "qlk_extra_here"))
    assert harness.extras_present() == ["qlk_extra_here"]
