"""Provenance: stable config hash, git commit or 'unknown', data and metrics hashes, no torch import."""

import json
import subprocess
import sys

from duplus.hashing import sha256_file
from duplus.report import provenance


def test_config_hash_ignores_key_order_but_not_values():
    a = {"seed": 0, "model": {"preset": "tiny", "overrides": {}}}
    b = {"model": {"overrides": {}, "preset": "tiny"}, "seed": 0}
    assert provenance.config_hash(a) == provenance.config_hash(b)
    assert provenance.config_hash(a) != provenance.config_hash({**a, "seed": 1})


def test_git_commit_unknown_outside_a_repository(tmp_path):
    assert provenance.git_commit(tmp_path) == {"commit": "unknown", "dirty": None}


def test_git_commit_inside_a_repository(tmp_path):
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, env=env)

    run("init", "-q")
    (tmp_path / "f.txt").write_text("x")
    run("add", "f.txt")
    run("commit", "-q", "-m", "init")
    head = run("rev-parse", "HEAD").stdout.decode().strip()
    assert provenance.git_commit(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f.txt").write_text("y")
    assert provenance.git_commit(tmp_path)["dirty"] is True


def test_collect_provenance(tmp_path, config, results):
    record = provenance.collect_provenance(config, results, [results / "evaluate/universal/summary.csv"], device="cpu")
    manifest = tmp_path / "data/preprocessed/demo_abdomen_ct/manifest.csv"
    assert record["data_manifests"] == {"demo_abdomen_ct": {"path": str(manifest), "sha256": sha256_file(manifest)}}
    summary = results / "evaluate/universal/summary.csv"
    assert record["metrics_files"] == {"evaluate/universal/summary.csv": sha256_file(summary)}
    assert record["seed"] == 0 and record["evaluation_device"] == "cpu"
    assert record["config_sha256"] == provenance.config_hash(config)
    assert set(provenance.PACKAGES) <= set(record["packages"])
    assert provenance.package_versions(["no-such-package-xyz"]) == {"no-such-package-xyz": None}
    assert record["hardware"]["cpu_count"] >= 1
    path = provenance.write_provenance(tmp_path / "p.json", record)
    assert json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(record))


def test_report_package_never_imports_torch():
    code = ("import sys, duplus.report.build, duplus.report.provenance as p; p.package_versions(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          check=True)
    assert done.stdout.strip() == "False"
