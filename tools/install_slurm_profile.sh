#!/usr/bin/env bash
# Installs profiles/slurm as the Snakemake profile named `slurm`, where Snakemake looks for profiles
# by name (${XDG_CONFIG_HOME:-~/.config}/snakemake/slurm), so that `snakemake --profile slurm all`
# works from the repository root. A profile already there is never touched: a site's own (executor,
# partition, account) serves this workflow as well, since the workflow declares every job's resources.
# Usage: tools/install_slurm_profile.sh   (run by `make venv`)
set -euo pipefail

SOURCE="$(cd "$(dirname "$0")/.." && pwd)/profiles/slurm/config.yaml"
TARGET_DIR="${XDG_CONFIG_HOME:-$HOME/.config}/snakemake/slurm"

# Snakemake reads profile.yaml before config.yaml (and versioned names such as config.v9+.yaml).
existing=""
if [[ -d "$TARGET_DIR" ]]; then
    existing=$(find "$TARGET_DIR" -maxdepth 1 \( -name 'profile*.yaml' -o -name 'config*.yaml' \) | head -n 1)
fi
if [[ -n "$existing" ]]; then
    if cmp -s "$SOURCE" "$existing"; then
        echo "slurm profile: $existing is up to date"
    else
        echo "slurm profile: keeping $existing (yours; this workflow's jobs declare their own resources)"
    fi
    exit 0
fi
mkdir -p "$TARGET_DIR"
cp "$SOURCE" "$TARGET_DIR/config.yaml"
echo "slurm profile: installed $TARGET_DIR/config.yaml (add your partition and account there)"
