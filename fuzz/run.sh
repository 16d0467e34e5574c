#!/usr/bin/env bash
# Runs every fuzz target (or those named) for a bounded time, seeding each corpus with the real
# inputs in the repository first, and prints how many inputs each target executed.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 seconds, every target)
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`). Logs go to
# fuzz/logs/<target>.log, crashing inputs to fuzz/artifacts/<target>/. Exits non-zero when a
# target crashed.
set -euo pipefail

seconds="${1:-60}"
shift || true
cd "$(dirname "$0")"

all_targets=(event_body signature_headers workflow_compile template_compile durations)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi

# Seeds: the example events, workflows and templates herald ships, and the values those
# workflows write; for signatures, the published Standard Webhooks test vector in the target's
# input layout (id, timestamp, signature, secret, body; one per line).
seed_files() {
    local target=$1
    shift
    mkdir -p "corpus/$target"
    cp "$@" "corpus/$target/"
}
seed_text() {
    local target=$1 name=$2 text=$3
    mkdir -p "corpus/$target"
    printf '%s' "$text" >"corpus/$target/seed-$name"
}
seed_files event_body ../examples/*.json
seed_files workflow_compile ../workflows/*.yaml ../templates/*
seed_files template_compile ../templates/*
seed_text workflow_compile schedule 'name: Weekly
re_entry: true
trigger:
  schedule: "0 9 * * MON-FRI"
  timezone: Europe/Berlin
  audience: {offers: [o_pro], products: [p_async], inactive_for: 7d}
steps:
  - send_email: {subject: "Hi {{contact.first_name}}", text: "Still there?"}
'

# durations: the first character picks the place in the workflow; '0' to '8' cover all nine.
for value in 30s 15m 4h 2d 3d 1w 09:00 18:00 02:30 Europe/Berlin America/New_York contact mon fri; do
    for place in 0 1 2 3 4 5 6 7 8; do
        seed_text durations "$place-${value//\//_}" "$place$value"
    done
done
seed_text signature_headers vector "msg_p5jXN8AQM9LWM0D4loKWxJek
1614265330
v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=
whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
{\"test\": 2432232314}"

# No AddressSanitizer: herald-core has no unsafe code and what is looked for is panics (debug
# assertions and overflow checks stay on); without it the targets run 3 to 50 times faster.
cargo +nightly fuzz build --sanitizer none
mkdir -p logs
failed=0
summary=()
for target in "${targets[@]}"; do
    log="logs/$target.log"
    echo "== $target: ${seconds}s"
    status=ok
    # -timeout: an input that takes over 10 s is reported as a hang, not waited out.
    if ! cargo +nightly fuzz run --sanitizer none "$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=10 >"$log" 2>&1; then
        # Stopped early with SIGINT (to free the machine): not a finding.
        if grep -q 'libFuzzer: run interrupted' "$log"; then
            status="interrupted, no crash"
        else
            status="CRASH (see $log and artifacts/$target/)"
            failed=1
        fi
    fi
    executions=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1)
    summary+=("$(printf '%-18s %6ss %12s executions  %s' "$target" "$seconds" "${executions:-?}" "$status")")
done
echo
printf '%s\n' "${summary[@]}"
exit "$failed"
