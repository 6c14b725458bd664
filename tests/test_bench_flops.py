"""bench/flops.py at smoke size: every row is produced and the counter sees the DP step's products."""
import pytest

pytest.importorskip("opacus")


def test_flops_rows():
    from bench.flops import METHODS, rows, table
    from bench.suite import model_configs
    rs = rows(smoke=True)
    assert [(r["config"], r["method"]) for r in rs] == [(c.name, m) for c in model_configs(True) for m in METHODS]
    for r in rs:
        base = next(b["flops"] for b in rs if b["config"] == r["config"] and b["method"] == "nonprivate")
        # a DP step computes the non-private step's products and its per-sample norms on top
        assert r["flops"] >= base > 0 and r["x_nonprivate"] == pytest.approx(r["flops"] / base)
    bert = {r["method"]: r for r in rs if r["config"] == "bert-tiny"}
    # bert-tiny (T = 16, width 32) takes the ghost norm: its Gram matrices are batched products, counted
    assert bert["anadp"]["by_op"].get("bmm", 0) > 0 and bert["nonprivate"]["by_op"].get("bmm", 0) == 0
    assert table(rs).count("\n") == len(rs) + 2
