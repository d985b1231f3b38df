#!/usr/bin/env bash
# Runs every container the Helm chart renders (as listed by scripts/check-chart.sh) with
# `--check-config` and exactly the rendered arguments and environment: the binaries must
# accept what the chart gives them.
# Usage: scripts/check-config.sh CONTAINERS_FILE BIN_DIR
set -euo pipefail
containers=$1
bin_dir=$2
python3 - "$containers" "$bin_dir" <<'PY'
import json, os, subprocess, sys

containers, bin_dir = sys.argv[1], sys.argv[2]
failed = passed = 0
for line in open(containers):
    line = line.rstrip("\n")
    if not line:
        continue
    binary, args, env = line.split("\t")
    args, env = json.loads(args), json.loads(env)
    cmd = [os.path.join(bin_dir, binary), *args, "--check-config"]
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    r = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True, timeout=30)
    if r.returncode == 0:
        passed += 1
    else:
        failed += 1
        print(f"REFUSED: {' '.join(cmd[1:] and [binary, *args])} with {sorted(env)}:\n{r.stderr.strip()}", file=sys.stderr)
print(f"check-config: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
