# SPDX-License-Identifier: Apache-2.0
"""The PEFT-suite gate's own logic (tests/peft_suite): what counts as a patched-only failure and
what counts as "needs the hub". The gate itself runs with `make peft-suite`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace


def _load(name):
    path = Path(__file__).parent / "peft_suite" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"peft_suite_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peft_gate_plugin, run = _load("peft_gate_plugin"), _load("run")


def results(outcomes, fused=None, returncode=0):
    return {"outcomes": outcomes, "fused_calls": fused or {}, "patched_models": 0, "returncode": returncode}


def test_patched_only_failures_are_counted_and_known_rounding_is_reported_apart():
    known = next(iter(run.KNOWN_ROUNDING)) + "[case]"
    plain = results({"a": "passed", "b": "passed", "c": "failed", "d": "hub", known: "passed", "e": "passed"})
    patched = results({"a": "passed", "b": "failed", "c": "failed", "d": "hub", known: "failed"})
    regressions, rounding, counts = run.compare(plain, patched)
    assert regressions == ["b", "e"]  # e: passed plainly, missing (crashed) patched
    assert rounding == [known]
    assert counts["patched-only failures"] == 2 and counts["skipped, need the hub (offline)"] == 1
    assert counts["failed plainly (not counted against the gate)"] == 1


def test_hub_errors_are_recognised_through_the_cause_chain():
    def info(exc):
        return SimpleNamespace(value=exc)

    try:
        try:
            raise ConnectionError("Cannot reach https://huggingface.co/api/models/x")
        except ConnectionError as inner:
            raise OSError("could not load the model") from inner
    except OSError as outer:
        assert peft_gate_plugin._needs_hub(info(outer))
    assert not peft_gate_plugin._needs_hub(info(AssertionError("tensors differ")))


def test_only_selects_full_entries_by_file_name_in_full_order():
    chosen = run.select("test_other, test_lora_variants.py")
    assert [entry[0] for entry in chosen] == ["tests/test_lora_variants.py", "tests/test_other.py"]
    assert run.select("test_custom_models") == [run.FULL[0]]  # its -k lora comes along
    for bad in ("test_nope", "", "test_other,test_nope"):
        try:
            run.select(bad)
        except SystemExit as exc:
            assert "--only" in str(exc)
        else:
            raise AssertionError(f"--only {bad!r} was accepted")


def test_a_timed_out_file_fails_the_gate_and_is_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(run, "prepare", lambda cache: (tmp_path, tmp_path))
    monkeypatch.setattr(run, "run_pytest", lambda *args: None)  # what run_pytest returns on a timeout
    monkeypatch.setattr(run.signal, "signal", lambda *args: None)
    assert run.main(["--only", "test_other", "--timeout", "5", "--cache", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "TIMED OUT: tests/test_other.py plain after 5 s" in out
    assert "TIMED OUT (not compared, fails the gate): tests/test_other.py" in out and "[peft-suite] FAILED" in out


def test_run_pytest_kills_a_run_past_its_timeout(tmp_path):
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(120)\n")
    start = run.time.time()
    assert run.run_pytest(tmp_path, tmp_path, ["test_slow.py"], [], False, tmp_path / "out.json", 5) is None
    assert run.time.time() - start < 60


def _main_with(monkeypatch, tmp_path, patched_results):
    monkeypatch.setattr(run, "prepare", lambda cache: (tmp_path, tmp_path))
    plain = results({"t": "passed"})
    monkeypatch.setattr(run, "run_pytest", lambda *args: patched_results if args[4] else plain)
    monkeypatch.setattr(run.signal, "signal", lambda *args: None)
    return run.main(["--only", "test_other", "--cache", str(tmp_path)])


def test_no_fused_calls_fail_only_where_lora_layers_ran_peft_forward(monkeypatch, tmp_path, capsys):
    ran_peft = {**results({"t": "passed"}), "peft_forwards": {"tests/test_other.py": 3}}
    assert _main_with(monkeypatch, tmp_path, ran_peft) == 1
    assert "NO FUSED CALLS in tests/test_other.py" in capsys.readouterr().out
    assert _main_with(monkeypatch, tmp_path, results({"t": "passed"})) == 0  # no LoRA forward at all
    assert "no LoRA-layer forward" in capsys.readouterr().out


def test_a_pytest_error_fails_the_gate(monkeypatch, tmp_path, capsys):
    # a collection error (exit status 2) leaves no outcomes: nothing would differ between the runs
    assert _main_with(monkeypatch, tmp_path, results({}, returncode=2)) == 1
    assert "PYTEST ERROR in tests/test_other.py: exit status [2]" in capsys.readouterr().out
