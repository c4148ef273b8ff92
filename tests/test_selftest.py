"""sigvlp.selftest: passes on healthy backends, fails (exit 1) on a deliberately broken one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sigvlp import selftest
from sigvlp.ops import OPS


def _statuses(checks):
    return {(c.op, c.backend, c.dtype): c.status for c in checks}


def test_torch_backends_pass_on_cpu():
    checks = selftest.run_checks("cpu", backends=["torch"], dtypes=["float32", "bfloat16"])
    assert {c.op for c in checks} == set(OPS)
    assert all(c.status == "PASS" for c in checks), [c.line() for c in checks]
    for c in checks:
        assert c.fwd_err is not None and c.fwd_err <= c.tol
        assert (c.bwd_err is None) == (c.op == "newton_schulz")


def test_triton_in_interpreter_and_bf16_dot_skip():
    checks = selftest.run_checks("cpu", ops=["sigmoid_loss"], backends=["triton"], dtypes=["float32", "bfloat16"])
    assert _statuses(checks) == {("sigmoid_loss", "triton", "float32"): "PASS",
                                 ("sigmoid_loss", "triton", "bfloat16"): "SKIP"}


def _break(monkeypatch, op, name, fn):
    bset = OPS[op]
    monkeypatch.setitem(bset.backends, name, dataclasses.replace(bset.backends[name], run=fn))


@pytest.mark.parametrize("op", ["rope3d", "newton_schulz"])
def test_wrong_values_fail(monkeypatch, capsys, op):
    original = OPS[op].backends["torch"].run

    def off_by_a_little(*args):
        result = original(*args)
        out = args[1]  # both runners write their result into their second argument
        out.add_(1e-3 * out.abs().max())
        return result

    _break(monkeypatch, op, "torch", off_by_a_little)
    checks = selftest.run_checks("cpu", ops=[op], backends=["torch"], dtypes=["float32"])
    assert [c.status for c in checks] == ["FAIL"]
    assert checks[0].fwd_err > checks[0].tol
    assert selftest.main(["--device", "cpu", "--ops", op, "--backends", "torch", "--dtypes", "float32"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bf16_bound_is_relative_to_bf16_rounding(monkeypatch):
    """The bounds come from sigvlp.ops.tolerances (multiples of the unit roundoff): rope3d in
    bfloat16 is checked at 3 x 2^-8, so a result off by 1e-2 of its largest value (2.6 bf16 units;
    the old 3e-2 bound let it through) fails."""
    from sigvlp.ops import tolerances

    assert selftest.tolerance("rope3d", "torch", torch.bfloat16) == 3 * 2.0 ** -8
    assert tolerances.tolerance("rope3d", "cuda", torch.bfloat16) == selftest.tolerance("rope3d", "cuda",
                                                                                       torch.bfloat16)
    (healthy,) = selftest.run_checks("cpu", ops=["rope3d"], backends=["torch"], dtypes=["bfloat16"])
    assert healthy.status == "PASS"
    original = OPS["rope3d"].backends["torch"].run

    def off_by_a_little(*args):
        result = original(*args)
        args[1].add_(1e-2 * args[1].abs().max())
        return result

    _break(monkeypatch, "rope3d", "torch", off_by_a_little)
    (check,) = selftest.run_checks("cpu", ops=["rope3d"], backends=["torch"], dtypes=["bfloat16"])
    assert check.status == "FAIL" and check.tol < check.fwd_err < 3e-2


def test_crash_fails(monkeypatch):
    def crash(*args):
        raise RuntimeError("kernel exploded")

    _break(monkeypatch, "sigmoid_loss", "torch", crash)
    (check,) = selftest.run_checks("cpu", ops=["sigmoid_loss"], backends=["torch"], dtypes=["float32"])
    assert check.status == "FAIL" and "kernel exploded" in check.note


def test_cli_output_and_exit(capsys, tmp_path):
    out = tmp_path / "selftest.json"
    rc = selftest.main(["--device", "cpu", "--ops", "sigmoid_loss", "--backends", "torch,cuda",
                        "--dtypes", "float16", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "sigmoid_loss" in text and "PASS" in text and " 0 failed" in text
    assert out.exists()


def test_bad_names():
    with pytest.raises(ValueError, match="ops"):
        selftest.run_checks("cpu", ops=["rope4d"])
    with pytest.raises(ValueError, match="dtypes"):
        selftest.run_checks("cpu", dtypes=["float8"])


def test_error_metric():
    want = torch.tensor([1.0, -2.0, 4.0])
    assert selftest.rel_err(want + torch.tensor([0.0, 0.4, 0.0]), want) == pytest.approx(0.1)
    assert selftest.rel_err(torch.tensor([1.0, float("nan"), 4.0]), want) == float("inf")


@pytest.mark.parametrize("argv, flag, valid", [
    (["--ops", "bogus"], "--ops", "sigmoid_loss"),
    (["--dtypes", "float64"], "--dtypes", "bfloat16"),
    (["--backends", "bogus"], "--backends", "triton"),
    (["--ops", "rope3d,bogus"], "--ops", "rope3d"),
])
def test_cli_bad_names_are_usage_errors(capsys, argv, flag, valid):
    with pytest.raises(SystemExit) as e:
        selftest.main(["--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"{flag}: unknown" in err and valid in err and "Traceback" not in err


def test_run_checks_unknown_backend():
    with pytest.raises(ValueError, match="backends"):
        selftest.run_checks("cpu", backends=["bogus"])
