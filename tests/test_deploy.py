"""`wrangler deploy --dry-run` bundles the real wrangler.toml (it runs the build command)."""

import subprocess

from harness import ROOT, WRANGLER, tool_env


def test_deploy_dry_run_bundles_the_real_config(tmp_path):
    env = tool_env(WRANGLER_LOG_PATH=str(tmp_path / "logs"))
    out = subprocess.run(
        [str(WRANGLER), "deploy", "--dry-run", "--outdir", str(tmp_path / "dist")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--dry-run: exiting now." in out.stdout, out.stdout
    assert (tmp_path / "dist" / "index.js").exists()
    assert any(p.suffix == ".wasm" for p in (tmp_path / "dist").iterdir())
