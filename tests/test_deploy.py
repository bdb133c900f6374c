"""`wrangler deploy --dry-run` bundles the real wrangler.toml (it runs the build command)."""

import re
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
    # Cloudflare's limit on a Worker is 10 MiB gzipped (3 MiB on Free); Ferry keeps under 1.5 MiB.
    match = re.search(r"gzip: ([0-9.]+) KiB", out.stdout)
    assert match, out.stdout
    assert float(match.group(1)) < 1.5 * 1024, f"the bundle is {match.group(1)} KiB gzipped, over 1.5 MiB"
