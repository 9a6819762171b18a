"""The notebook runner: parameter validation, execution into results/, resume, output cap, README table."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from reproduce import params as P
from reproduce.run import cap_outputs
from reproduce.table import END, START, markdown, write_readme

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from py2nb import convert  # noqa: E402

NB_SRC = '''
# %%
profile = "smoke"
seed = 0
steps = 3  # number of steps
loss = "infonce"  # one of: infonce, decomposable
lr = 0.1
# %%
from reproduce.notebook import start_run
run = start_run("00_toy", profile=profile, seeds=[seed], params=dict(steps=steps, loss=loss, lr=lr))
print("x" * 50000)
run.finish({"steps": steps}, summary=[{"experiment": "toy", "metric": "steps", "value": float(steps),
                                        "paper_key": "tcm.max_r1_gain"}])
'''


@pytest.fixture
def repo(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "paper_numbers.yaml").write_text((ROOT / "configs" / "paper_numbers.yaml").read_text())
    nbformat.write(convert(NB_SRC), tmp_path / "notebooks" / "00_toy.ipynb")
    (tmp_path / "README.md").write_text(f"# x\n{START}\nold\n{END}\ntail\n")
    monkeypatch.setenv("CONTRASTIVE_REPRO_ROOT", str(tmp_path))
    monkeypatch.delenv("CONTRASTIVE_REPRO_RESULTS", raising=False)
    return tmp_path


def test_parameters_cell_is_read_with_types_and_choices(repo):
    spec = P.notebook_parameters(repo / "notebooks" / "00_toy.ipynb")
    assert spec["steps"]["type"] == "int" and spec["steps"]["default"] == 3
    assert spec["loss"]["choices"] == ["infonce", "decomposable"]


@pytest.mark.parametrize("override, words", [
    ({"stepz": 3}, ["unknown parameter 'stepz'", "allowed:", "steps"]),
    ({"steps": "many"}, ["'steps' must be int"]),
    ({"loss": "triplet"}, ["'loss'", "one of: infonce, decomposable"]),
    ({"lr": True}, ["'lr' must be float"]),
])
def test_bad_parameters_are_named(repo, override, words):
    with pytest.raises(P.ParameterError) as e:
        P.validate(repo / "notebooks" / "00_toy.ipynb", override)
    for w in words:
        assert w in str(e.value)


def test_good_parameters_pass(repo):
    assert P.validate(repo / "notebooks" / "00_toy.ipynb", {"steps": 5, "lr": 1, "loss": "decomposable"})


def test_unknown_profile_rejected(repo):
    with pytest.raises(P.ParameterError, match="allowed: smoke, cpu, paper"):
        P.load_profile("gpu", repo / "configs")


def _run(repo, *args):
    return subprocess.run([sys.executable, "-m", "reproduce.run", *args], cwd=repo, capture_output=True, text=True,
                          timeout=240)


def test_runner_executes_caps_output_and_resumes(repo):
    (repo / "configs" / "cpu").mkdir()
    (repo / "configs" / "cpu" / "00_toy.yaml").write_text("steps: 7\n")
    r = _run(repo, "--profile", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    out = repo / "results" / "00_toy" / "cpu"
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["metrics"] == {"steps": 7} and rec["profile"] == "cpu" and rec["seeds"] == [0]
    assert {"commit", "versions", "device"} <= set(rec["provenance"])
    executed = (out / "executed.ipynb").read_text()
    assert "[output truncated by reproduce.run]" in executed and len(executed) < 40_000
    r2 = _run(repo, "--profile", "cpu")
    assert "complete, skipped" in r2.stdout
    (repo / "configs" / "cpu" / "00_toy.yaml").write_text("steps: 8\n")  # new parameters: runs again
    r3 = _run(repo, "--profile", "cpu")
    assert "done in" in r3.stdout and json.loads((out / "metrics.json").read_text())["metrics"]["steps"] == 8
    # the README table is generated from the JSON, with the paper's number looked up by key
    t = subprocess.run([sys.executable, "-m", "reproduce.table", "--write-readme"], cwd=repo, capture_output=True,
                       text=True, timeout=60)
    assert t.returncode == 0, t.stderr
    readme = (repo / "README.md").read_text()
    assert "| 00_toy | toy | steps | 8 |" in readme and "| 3.6 |" in readme and readme.endswith("tail\n")


def test_runner_rejects_bad_config_before_running(repo):
    (repo / "configs" / "cpu").mkdir()
    (repo / "configs" / "cpu" / "00_toy.yaml").write_text("loss: triplet\n")
    r = _run(repo, "--profile", "cpu")
    assert r.returncode == 2 and "one of: infonce, decomposable" in r.stderr
    assert not (repo / "results").exists()


def test_failed_notebook_keeps_partial_output(repo):
    nbformat.write(convert(NB_SRC.replace('print("x" * 50000)', 'raise RuntimeError("boom")')),
                   repo / "notebooks" / "00_toy.ipynb")
    r = _run(repo, "--profile", "smoke")
    assert r.returncode == 1 and "FAILED" in r.stdout and "boom" in r.stdout
    assert (repo / "results" / "00_toy" / "smoke" / "failed.ipynb").is_file()


def test_cap_outputs_truncates_streams():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="y" * 100_000)]
    assert cap_outputs(nb) == 1 and len(nb.cells[0].outputs[0]["text"]) < 25_000


def test_markdown_table_and_readme_markers(tmp_path):
    assert "make reproduce" in markdown([])
    readme = tmp_path / "README.md"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        write_readme(readme, "t")


# ------------------------------------------------------------------------------------------- the claims ledger
def test_claim_rows_ledger_and_gates(tmp_path, monkeypatch):
    import json

    from contrastive_repro.stats import gate, paired_verdict
    from reproduce import claims as cl

    v = paired_verdict([0.5, 0.52, 0.49], [0.6, 0.63, 0.58])
    ok = gate(0.6, {"chance": 0.1}, margin=0.05)
    bad = gate(0.12, {"chance": 0.1}, margin=0.05)
    row = cl.claim_row("tcm.x", "tcm", "TCM helps", "emoji", "R@1", v, gates=[ok])
    assert row["verdict"] == "reproduced" and row["gate_passed"] is True and row["paper_value"] is None
    row2 = cl.claim_row("tcm.y", "tcm", "TCM helps", "emoji", "R@1", v, gates=[ok, bad])
    assert row2["verdict"] == "uninformative" and row2["test_verdict"] == "reproduced"
    with pytest.raises(ValueError, match="paper must be one of"):
        cl.claim_row("x", "nope", "c", "t", "m", v)
    with pytest.raises(ValueError, match="claim id"):
        cl.claim_row("Bad Id", "tcm", "c", "t", "m", v)
    with pytest.raises(ValueError, match="duplicate"):
        cl.check_claims([row, row])
    # collect + markdown from a results tree: only complete records count
    for nb, status in (("07_a", "complete"), ("08_b", "failed")):
        d = tmp_path / nb / "cpu"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"notebook": nb, "status": status, "seeds": [0, 1, 2],
                                                    "provenance": {"commit": "abc"}, "claims": [row, row2]}))
    rows = cl.collect(tmp_path)
    assert [r["id"] for r in rows] == ["tcm.x", "tcm.y"] and rows[0]["notebook"] == "07_a"
    md = cl.markdown(rows)
    assert "1 reproduced, 1 uninformative" in md and "**uninformative**" in md
