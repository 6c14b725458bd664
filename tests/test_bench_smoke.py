"""The benchmark suite in smoke mode (tiny sizes), so that it cannot rot: every row is
produced, and the DP methods compute the same clipped (and, where comparable, noised) update."""
import pytest
import torch

from bench.run import noise_rows, run, same_update, table
from bench.suite import METHODS, build, layer_configs, make_step, model_configs



def test_every_row_is_produced():
    rows = run(smoke=True, rounds=1, isolate=False, progress=False)
    configs = layer_configs(True) + model_configs(True)
    assert [(r["config"], r["method"]) for r in rows] == [(c.name, m) for c in configs for m in METHODS]
    for r in rows:  # every method on every row, Opacus ghost clipping on the Hugging Face models too
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["x_nonprivate"] > 0
    assert table(rows).count("\n") == len(rows) + 1


def test_model_rows_keep_each_methods_fastest_interleaved_repeat(monkeypatch):
    """Whole-model rows are timed ``repeats`` times with the methods interleaved; a method keeps
    its fastest time, memory is measured once, layer rows once."""
    import bench.run as br
    calls = []

    def fake(cfg, method, rounds, isolate, memory=True):
        calls.append((cfg.name, method, memory))
        k = sum(1 for c in calls if c[:2] == (cfg.name, method))  # this method's k-th timing here
        out = {"seconds": {1: 3.0, 2: 1.0, 3: 2.0}[k] * (1 + METHODS.index(method))}
        return out | ({"peak_mb": 10.0} if memory else {})

    monkeypatch.setattr(br, "measure", fake)
    rows = run(smoke=True, rounds=1, isolate=False, progress=False, repeats=3)
    model = model_configs(True)[0].name
    assert [c[1] for c in calls if c[0] == model] == METHODS * 3  # interleaved, not one method's three in a row
    assert [c[2] for c in calls if c[0] == model] == [True] * len(METHODS) + [False] * 2 * len(METHODS)
    assert all(sum(c[0] == cfg.name for c in calls) == len(METHODS) for cfg in layer_configs(True))
    for r in rows:
        fastest = 1.0 if r["config"] in {c.name for c in model_configs(True)} else 3.0
        assert r["seconds"] == fastest * (1 + METHODS.index(r["method"])) and r["peak_mb"] == 10.0


@pytest.mark.parametrize("cfg", model_configs(True), ids=lambda c: c.name)
def test_anadp_rows_time_the_allocation(cfg, monkeypatch):
    """bench.run times steps 2, 3, ... of a fresh optimizer (step 1 is its warm-up); ANADP's allocation,
    its maximizer included, must run in every one of them, or the row times uniform DP plus bookkeeping
    (with the default warm-up of 10 steps it ran in none, until 2026-11-30)."""
    from anadp.allocation import AnadpAllocation
    ran, best = [], AnadpAllocation._best_for_step

    def recording(self, *args, **kwargs):
        ran.append(self.updates)
        return best(self, *args, **kwargs)

    monkeypatch.setattr(AnadpAllocation, "_best_for_step", recording)
    model, inputs, labels = build(cfg)
    step, _ = make_step("anadp", model, inputs, labels)
    for _ in range(4):
        step()
    assert step.optimizer.allocator.updates == 4
    assert {2, 3, 4} <= set(ran), ran


@pytest.mark.parametrize("cfg", layer_configs(True) + model_configs(True), ids=lambda c: c.name)
def test_same_clipped_update(cfg):
    upd = same_update(cfg, sigma=0.0)
    ref = upd["anadp_uniform"]
    assert ref is not None and ref.abs().max() > 0
    for method, u in upd.items():
        assert u is not None, f"{method} failed on {cfg.name}"  # bench.run.same_update: None where its step raised
        if method == "anadp_per_layer":  # another mechanism (each group clipped on its own): checked against
            assert u.abs().max() > 0     # per-sample autograd in tests/test_per_layer.py
            continue
        assert float((u - ref).norm() / ref.norm()) < 1e-5, method


def test_same_noised_update_for_anadp_and_uniform():
    """First step: ANADP is in warm-up (w = 1), so both draw the same Philox noise z; ANADP's
    gradient gets sigma_g = sigma / sqrt(1 - 1/share_noise^2) (its share release takes the rest)."""
    from anadp.allocation import AllocationConfig
    cfg = model_configs(True)[0]
    clean, upd = same_update(cfg, sigma=0.0)["anadp_uniform"], same_update(cfg, sigma=1.0)
    ratio = 1 / (1 - 1 / AllocationConfig().share_noise ** 2) ** 0.5
    expect = clean + ratio * (upd["anadp_uniform"] - clean)
    assert float((upd["anadp"] - expect).abs().max()) < 1e-6 * float(expect.abs().max())
    assert not torch.equal(upd["anadp"], upd["anadp_uniform"])


def test_noise_rows_time_every_way_of_drawing():
    rows = noise_rows(1 << 12, rounds=1)
    assert [r["noise"].split()[0] for r in rows] == ["cpu", "torch", "torch.randn"]
    assert all(r.get("M_per_s", 0) > 0 or "error" in r for r in rows)


def test_host_overhead_rows():
    """The compute-free row: every method times a step and counts the ops it dispatches; ANADP's step
    dispatches uniform DP's ops and more (its statistics' release and allocation run in the row)."""
    from bench import host_overhead
    rows = host_overhead.rows(rounds=1, cfg=host_overhead.SMOKE_CONFIG)
    assert [r["method"] for r in rows] == host_overhead.METHODS
    assert all(r["seconds"] > 0 and r["ops"] > 0 for r in rows)
    assert all(len(r["phases"]) == 3 and 0 < sum(r["phases"]) for r in rows)  # forward, backward, step
    assert rows[2]["ops"] > rows[1]["ops"]
    assert host_overhead.table(rows).count("\n") == len(rows) + 1


def test_fsdp_rows():
    """The 2-process FSDP2 row runs (tiny sizes): both settings time both methods."""
    from bench import fsdp
    rows = fsdp.rows(rounds=1, repeats=1, cfg=fsdp.SMOKE_CONFIG)
    assert [r["setting"].split(",")[0] for r in rows] == ["FSDP2", "1 process x 1 thread"]
    assert all(r["nonprivate"] > 0 and r["anadp"] > 0 and r["ratio"] == r["anadp"] / r["nonprivate"] for r in rows)
    assert fsdp.table(rows).count("\n") == len(rows) + 1


def test_the_generic_path_row_runs_every_method(capsys):
    """bench.generic_path --smoke: the ViT-like row, every method measured (in subprocesses), a table."""
    from bench.generic_path import METHODS as GENERIC_METHODS, main
    assert main(["--smoke"]) == 0
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in GENERIC_METHODS}
    assert set(rows) == set(GENERIC_METHODS)
    for m in ("nonprivate", "anadp_uniform", "anadp_per_layer"):
        assert float(rows[m]) > 0, rows[m]  # a step time, not an error
