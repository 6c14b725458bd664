"""The main job, in a smaller setting, through the real command line."""
import json
import subprocess
import sys


def test_demo_cli(tmp_path):
    out = tmp_path / "demo.json"
    cmd = [sys.executable, "-m", "anadp", "demo", "--train-size", "800", "--test-size", "200", "--epochs", "2",
           "--batch-size", "100", "--epsilon", "4", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("| ")]
    assert lines[0] == "| method | epsilon | delta | accuracy | seconds/step |"
    assert [l.split("|")[1].strip() for l in lines[1:]] == ["nonprivate", "uniform", "anadp"]
    assert "%" in proc.stderr  # a progress bar was drawn
    rows = json.loads(out.read_text())["rows"]
    for r in rows[1:]:
        # calibrated by Opacus to within its tolerance (0.01) below the target
        assert 4 - 0.1 < r["epsilon"] <= 4 + 1e-9, r
        assert r["delta"] == 1e-5 and 0 <= r["accuracy"] <= 1 and r["seconds_per_step"] > 0
        assert r["steps"] == 2 * 8
    assert rows[0]["epsilon"] is None  # non-private: infinite, written as null
    w = rows[2]["noise_scales"]
    assert min(w.values()) < 1 < max(w.values())  # ANADP moved off uniform
    assert "ANADP noise scales after training" in proc.stdout


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    from anadp.cli import main
    (ep,) = entry_points(group="console_scripts", name="anadp")
    assert ep.load() is main


def test_cli_rejects_unknown_command(capsys):
    import pytest

    from anadp.cli import main
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
