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


RANGED_SRC = '''
# %%
profile = "smoke"
seeds = [0, 1]  # range: [0, )
dropout = 0.1  # at least 0, < 1: range: [0, 1)
steps = 40  # > 0, < 100001
losses = ["a", "b"]  # one of: a, b, c
# %%
print(seeds)
'''


@pytest.fixture
def ranged_nb(tmp_path):
    path = tmp_path / "01_ranged.ipynb"
    nbformat.write(convert(RANGED_SRC), path)
    return path


@pytest.mark.parametrize("override, words", [
    ({"seeds": [0, "1"]}, ["'seeds'[1] must be int", "got '1'"]),
    ({"seeds": [0, 1.5]}, ["'seeds'[1] must be int"]),
    ({"seeds": [3, -1]}, ["'seeds'[1] = -1 is out of range: must be >= 0"]),
    ({"dropout": 1.0}, ["'dropout' = 1.0 is out of range: must be < 1"]),
    ({"dropout": -0.5}, ["'dropout' = -0.5 is out of range: must be >= 0"]),
    ({"steps": 0}, ["'steps' = 0 is out of range: must be > 0"]),
    ({"steps": 10**6}, ["must be < 100001"]),
    ({"losses": ["a", 3]}, ["'losses'[1] must be str"]),
    ({"losses": ["a", "z"]}, ["['z'] not allowed; one of: a, b, c"]),
])
def test_list_elements_and_ranges_are_checked(ranged_nb, override, words):
    with pytest.raises(P.ParameterError) as e:
        P.validate(ranged_nb, override)
    for w in words:
        assert w in str(e.value)


def test_ranges_accept_values_inside(ranged_nb):
    assert P.validate(ranged_nb, {"seeds": [0, 5], "dropout": 0.0, "steps": 100000, "losses": ["c"]})


@pytest.mark.parametrize("text, words", [
    ("steps: 3\nlr: [0.1\n", ["00_toy.yaml", "malformed YAML at line"]),
    ("steps: 3\n  lr: 2\n", ["00_toy.yaml", "malformed YAML at line 2"]),
    ("steps: 3\nsteps: 4\n", ["00_toy.yaml", "duplicate key 'steps'", "line 2"]),
    ("- steps\n- 3\n", ["00_toy.yaml", "expected a mapping", "list"]),
    ("3: 4\n", ["keys must be parameter names", "[3]"]),
])
def test_malformed_profile_yaml_names_file_and_line(repo, text, words):
    (repo / "configs" / "cpu").mkdir()
    (repo / "configs" / "cpu" / "00_toy.yaml").write_text(text)
    with pytest.raises(P.ParameterError) as e:
        P.load_profile("cpu", repo / "configs")
    for w in words:
        assert w in str(e.value), str(e.value)


def test_good_parameters_pass(repo):
    assert P.validate(repo / "notebooks" / "00_toy.ipynb", {"steps": 5, "lr": 1, "loss": "decomposable"})


def test_unknown_profile_rejected(repo):
    with pytest.raises(P.ParameterError, match="allowed: smoke, cpu, paper"):
        P.load_profile("gpu", repo / "configs")


def _run(repo, *args, cli: bool = False):
    """``python -m reproduce.run *args`` in ``repo``: with ``cli`` as a subprocess, else ``reproduce.run.main`` in
    this process (the notebooks still run in their own kernels). A fresh interpreter costs ~5 s a call before any
    notebook runs (torch, and the grammars nbformat's validator compiles on import), which these tests paid ~13
    times; one test goes through the command line to keep that covered."""
    if cli:
        return subprocess.run([sys.executable, "-m", "reproduce.run", *args], cwd=repo, capture_output=True,
                              text=True, timeout=240)
    import contextlib
    import io
    import os

    from reproduce import run as R

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    env = os.environ.get("CONTRASTIVE_REPRO_RESULTS")  # main() sets it for its kernels
    try:
        os.chdir(repo)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = R.main(list(args))
    finally:
        os.chdir(cwd)
        if env is None:
            os.environ.pop("CONTRASTIVE_REPRO_RESULTS", None)
        else:
            os.environ["CONTRASTIVE_REPRO_RESULTS"] = env
    return subprocess.CompletedProcess(["reproduce.run", *args], rc, out.getvalue(), err.getvalue())


LOCAL = Path("build") / "reproduce"


def _reference(repo, profile: str, steps: float, status: str = "complete", claims=None) -> Path:
    """A committed reference record results/00_toy/<profile>/metrics.json with one summary row."""
    rec = {"notebook": "00_toy", "profile": profile, "status": status, "params": {},
           "summary": [{"experiment": "toy", "metric": "steps", "value": float(steps)}], "claims": claims or []}
    path = repo / "results" / "00_toy" / profile / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


def test_reproduce_recomputes_into_a_local_folder_and_compares(repo):
    (repo / "configs" / "cpu").mkdir()
    (repo / "configs" / "cpu" / "00_toy.yaml").write_text("steps: 7\n")
    ref_path = _reference(repo, "cpu", steps=7)
    ref_text = ref_path.read_text()
    r = _run(repo, "--profile", "cpu", cli=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # the committed reference is never a cache nor overwritten: the run goes to build/reproduce/cpu/results
    assert ref_path.read_text() == ref_text
    out = repo / LOCAL / "cpu" / "results" / "00_toy" / "cpu"
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["status"] == "complete" and rec["metrics"] == {"steps": 7} and rec["seeds"] == [0]
    assert {"commit", "versions", "device", "dirty", "code_fingerprint"} <= set(rec["provenance"])
    executed = (out / "executed.ipynb").read_text()
    assert "[output truncated by reproduce.run]" in executed and len(executed) < 40_000
    assert not list(out.glob(".executing.*"))
    report = json.loads((repo / LOCAL / "cpu" / "comparison.json").read_text())
    nb = report["notebooks"]["00_toy"]
    assert nb["status"] == "match" and nb["summary"][0]["ours"] == 7.0 and nb["summary"][0]["reference"] == 7.0
    assert nb["wall_time_s"] > 0 and nb["resumed"] is False and report["timing"]["notebooks_s"] == nb["wall_time_s"]
    assert "00_toy: match, 1/1 rows and claims match" in r.stdout and "total:" in r.stdout

    # resume: complete in the local folder for these parameters and this code -> reused
    r2 = _run(repo, "--profile", "cpu")
    assert "reused" in r2.stdout and "running" not in r2.stdout
    # new parameters: recomputed; the comparison then reports the difference with the reference
    (repo / "configs" / "cpu" / "00_toy.yaml").write_text("steps: 8\n")
    r3 = _run(repo, "--profile", "cpu")
    assert "done in" in r3.stdout and json.loads((out / "metrics.json").read_text())["metrics"]["steps"] == 8
    assert "00_toy: differs" in r3.stdout and "ours 8, reference 7" in r3.stdout


def test_code_change_of_the_notebook_invalidates_the_local_run(repo):
    r = _run(repo, "--profile", "smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no reference" in r.stdout
    nbformat.write(convert(NB_SRC.replace('print("x" * 50000)', 'print("y")')), repo / "notebooks" / "00_toy.ipynb")
    r2 = _run(repo, "--profile", "smoke")
    assert r2.returncode == 0 and "running" in r2.stdout and "reused" not in r2.stdout
    # markdown edits do not count as code
    nb = nbformat.read(repo / "notebooks" / "00_toy.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("a remark"))
    nbformat.write(nb, repo / "notebooks" / "00_toy.ipynb")
    assert "reused" in _run(repo, "--profile", "smoke").stdout


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_record_refuses_a_dirty_tree_and_marks_it_when_allowed(repo):
    (repo / ".gitignore").write_text("build/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    (repo / "notebooks" / "helper.py").write_text("x = 1\n")  # uncommitted code
    r = _run(repo, "--profile", "smoke", "--record")
    assert r.returncode == 2 and "dirty" in r.stderr and "notebooks/helper.py" in r.stderr
    assert not (repo / "results").exists() and not (repo / "build").exists()

    r = _run(repo, "--profile", "smoke", "--record", "--allow-dirty")
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads((repo / "results" / "00_toy" / "smoke" / "metrics.json").read_text())
    assert rec["provenance"]["dirty"] is True and rec["provenance"]["commit"].endswith("-dirty")
    assert json.loads((repo / "results" / "00_toy" / "smoke" / "runner.json").read_text())["dirty"] is True

    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "helper")
    r = _run(repo, "--profile", "smoke", "--record")  # clean now: recomputed (new commit), recorded clean
    assert r.returncode == 0, r.stdout + r.stderr
    assert "running" in r.stdout
    rec = json.loads((repo / "results" / "00_toy" / "smoke" / "metrics.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert rec["provenance"]["dirty"] is False and rec["provenance"]["commit"] == head
    assert "00_toy: match" in r.stdout  # compared with the reference recorded before, same seeds
    prev = repo / "build" / "record" / "smoke" / "previous" / "00_toy" / "smoke" / "metrics.json"
    assert json.loads(prev.read_text())["provenance"]["dirty"] is True  # the snapshot taken before replacing it
    assert not (repo / "results" / "00_toy" / "smoke" / "checkpoints").exists()


def test_runner_rejects_bad_config_before_running(repo):
    (repo / "configs" / "cpu").mkdir()
    (repo / "configs" / "cpu" / "00_toy.yaml").write_text("loss: triplet\n")
    r = _run(repo, "--profile", "cpu")
    assert r.returncode == 2 and "one of: infonce, decomposable" in r.stderr
    assert not (repo / "results").exists() and not (repo / "build").exists()


def test_failed_notebook_never_leaves_a_complete_record(repo):
    assert _run(repo, "--profile", "smoke").returncode == 0
    out = repo / LOCAL / "smoke" / "results" / "00_toy" / "smoke"
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"
    nbformat.write(convert(NB_SRC.replace('print("x" * 50000)', 'raise RuntimeError("boom")')),
                   repo / "notebooks" / "00_toy.ipynb")
    r = _run(repo, "--profile", "smoke")
    assert r.returncode == 1 and "FAILED" in r.stdout and "boom" in r.stdout
    assert (out / "failed.ipynb").is_file() and not (out / "runner.json").exists()
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["status"] == "failed" and "boom" in rec["error"]
    assert not list(out.glob(".executing.*"))
    assert "no complete run" in r.stdout
    # a failure before start_run (here: in the parameters cell) also replaces the old record
    nbformat.write(convert(NB_SRC.replace('lr = 0.1', 'lr = 0.1\nraise ValueError("early")')),
                   repo / "notebooks" / "00_toy.ipynb")
    assert _run(repo, "--profile", "smoke").returncode == 1
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"


def test_interrupt_removes_temp_files_and_marks_failed(repo, tmp_path, monkeypatch):
    import papermill

    from reproduce import run as R

    monkeypatch.setenv("CONTRASTIVE_REPRO_RESULTS", str(tmp_path / "res"))
    out = tmp_path / "res" / "00_toy" / "smoke"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"status": "complete"}))
    (out / ".executing.old.ipynb").write_text("{}")  # left by a killed runner

    def interrupted(src, dst, **kw):
        Path(dst).write_text("not a notebook")
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        R.execute_and_store(repo / "notebooks" / "00_toy.ipynb", "smoke", {}, 10)
    assert not list(out.glob(".executing.*"))
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"


def test_table_reads_only_complete_records(repo):
    from reproduce.table import collect
    from reproduce.table import main as table_main

    _reference(repo, "cpu", steps=3, status="failed")
    assert collect(repo / "results") == []
    path = _reference(repo, "cpu", steps=8)
    rec = json.loads(path.read_text())
    rec["summary"][0]["paper_key"] = "tcm.max_r1_gain"
    path.write_text(json.dumps(rec))
    assert table_main(["--write-readme"]) == 0
    readme = (repo / "README.md").read_text()
    assert "| 00_toy | toy | steps | 8 |" in readme and "| 3.6 |" in readme and readme.endswith("tail\n")


def test_subrun_cache_and_checkpoints_are_keyed_on_params_and_code(repo, monkeypatch):
    from reproduce import notebook as N

    calls = []

    def compute(value):
        calls.append(value)
        return {"value": value}

    run = N.start_run("00_toy", profile="smoke", seeds=[0], params={"steps": 3})
    assert json.loads((run.dir / "metrics.json").read_text())["status"] == "running"
    assert set(run.fingerprint) == {"library", "notebook", "data"}
    assert run.cached("a", lambda: compute(1)) == {"value": 1}
    assert run.cached("a", lambda: compute(2)) == {"value": 1} and calls == [1]  # same params and code: reused
    key, ckpt = run.key, run.checkpoint_dir

    again = N.start_run("00_toy", profile="smoke", seeds=[0], params={"steps": 4})  # other parameters
    assert again.cached("a", lambda: compute(3)) == {"value": 3} and again.checkpoint_dir != ckpt

    # the same parameters with another version of the library: recomputed, and a checkpoint folder of its own
    monkeypatch.setattr(N, "code_fingerprint", lambda: "edited")
    edited = N.start_run("00_toy", profile="smoke", seeds=[0], params={"steps": 3})
    assert edited.key != key and edited.checkpoint_dir != ckpt
    assert edited.cached("a", lambda: compute(4)) == {"value": 4} and calls == [1, 3, 4]
    rec = json.loads((edited.runs_dir / "a.json").read_text())
    assert rec["fingerprint"]["library"] == "edited" and rec["params"]["steps"] == 3


def test_data_and_notebook_fingerprints(tmp_path, monkeypatch):
    from contrastive_repro.provenance import code_fingerprint, data_fingerprint, notebook_fingerprint

    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    (lib / "a.py").write_text("x = 1\n")
    (lib / "sub" / "b.py").write_text("y = 2\n")
    fp = code_fingerprint(lib)
    assert code_fingerprint(lib) == fp
    (lib / "sub" / "b.py").write_text("y = 3\n")
    assert code_fingerprint(lib) != fp

    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    assert data_fingerprint() == "none"
    (tmp_path / "data" / "CUB_200_2011").mkdir(parents=True)
    first = data_fingerprint()
    (tmp_path / "data" / "cars196").mkdir()
    assert first != "none" and data_fingerprint() != first

    nb = tmp_path / "n.ipynb"
    nbformat.write(convert(NB_SRC), nb)
    before = notebook_fingerprint(nb)
    book = nbformat.read(nb, as_version=4)
    book.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="out")]
    nbformat.write(book, nb)
    assert notebook_fingerprint(nb) == before  # outputs are not code
    book.cells[1].source += "\nz = 1"
    nbformat.write(book, nb)
    assert notebook_fingerprint(nb) != before and notebook_fingerprint(tmp_path / "none.ipynb") == "missing"


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


def test_test_timings_reads_junit_reports(tmp_path):
    from reproduce import test_timings as tt

    xml = ('<?xml version="1.0"?><testsuites><testsuite name="pytest" time="42.5">'
           '<testcase classname="notebooks.01_a.ipynb" name="Cell 0" time="1.5"/>'
           '<testcase classname="notebooks.01_a.ipynb" name="Cell 1" time="2.0"/>'
           '<testcase classname="notebooks.02_b.ipynb" name="Cell 0" time="61.0"/>'
           '<testcase classname="tests.test_x" name="test_y" time="9.0"/></testsuite></testsuites>')
    (tmp_path / "unit.xml").write_text(xml)
    (tmp_path / "nbval.xml").write_text(xml)
    assert tt.suite_seconds(tmp_path / "unit.xml") == 42.5
    assert tt.notebook_seconds(tmp_path / "nbval.xml") == {"01_a": 3.5, "02_b": 61.0}
    tt.main(["--reports", str(tmp_path), "--write", str(tmp_path / "t.json"), "--total-s", "600"])
    out = json.loads((tmp_path / "t.json").read_text())
    assert out["over_budget"] == ["02_b"] and out["make_test_total_s"] == 600
