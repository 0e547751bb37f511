#!/usr/bin/env bash
# Run every fuzz target for SECONDS (default 30) on its seed corpus, with the machine's stable
# toolchain. Exits non-zero if any target crashes (the input lands in fuzz/artifacts/<target>/).
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-30}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frame switch nat control replay dns uplink)
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz passes nightly-only flags (-Zsanitizer=address and friends); stable rustc accepts
# them when bootstrapping is allowed. The sanitizer runtimes ship with stable's rust-std.
export RUSTC_BOOTSTRAP=1

for t in "${targets[@]}"; do
    cargo fuzz build -O --debug-assertions "$t"
done

# New inputs go to a scratch directory: the committed seed corpus stays as it is.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
    echo "== fuzz $t for ${secs}s"
    mkdir -p "$work/$t"
    seeds=()
    if [ -d "corpus/$t" ]; then
        seeds=("corpus/$t")
    fi
    if ! cargo fuzz run -O --debug-assertions "$t" "$work/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$work/$t.log" 2>&1; then
        tail -n 60 "$work/$t.log"
        failed+=("$t")
    else
        grep -E "^(stat::number_of_executed_units|stat::new_units_added|Done)" "$work/$t.log" || true
    fi
done
if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${secs}s each without a crash"
