#!/usr/bin/env bash
# End-to-end check of the terminal workbench: start the real `road tui` in a tmux pseudo
# terminal over the fixture runs, open a run's results, read the screen, quit, and check the
# terminal was restored (alternate screen left). Skips (exit 0) only when tmux is missing.
#   ROAD_BIN=path/to/road   the binary (default target/release/road, built if missing)
#   CAPTURE=file            also write the results-view screen text to this file
#   COLS, ROWS              terminal size (default 100x30)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v tmux >/dev/null 2>&1; then
    echo "tui-e2e: tmux is not installed; skipping (apt-get install tmux to run this check)"
    exit 0
fi
BIN="${ROAD_BIN:-target/release/road}"
if [ ! -x "$BIN" ]; then cargo build --release; fi
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
SOCK="road-tui-e2e-$$"            # a private tmux server: never touches anyone else's sessions
T=(tmux -L "$SOCK" -f /dev/null)
cleanup() { "${T[@]}" kill-server >/dev/null 2>&1 || true; }
trap cleanup EXIT

"${T[@]}" new-session -d -s e2e -x "${COLS:-100}" -y "${ROWS:-30}" \
    "env -u NO_COLOR ROAD_OUT=tests/fixtures/runs TERM=xterm-256color '$BIN' tui; echo \"EXITED rc=\$?\"; sleep 30"

screen() { "${T[@]}" capture-pane -p -t e2e; }
wait_for() {
    for _ in $(seq 1 100); do
        if screen | grep -qF -- "$1"; then return 0; fi
        sleep 0.1
    done
    echo "tui-e2e: timed out waiting for '$1'; screen:"; screen; exit 1
}

wait_for "1 Experiments"
"${T[@]}" send-keys -t e2e 3                  # Results view: the run picker
wait_for "20250101-120000-aaaa1111"
"${T[@]}" send-keys -t e2e Down Enter         # the older fixture run (newest is listed first)
wait_for "layer × position"
"${T[@]}" send-keys -t e2e Down Down Down Right Right Right Right Right
wait_for "L3 · 5"
shot="$(screen)"
echo "$shot"
grep -qF "fixture-patching/20250101-120000-aaaa1111" <<<"$shot" || { echo "tui-e2e: run title missing"; exit 1; }
grep -qF "iia_vocab = 0.3050" <<<"$shot" || { echo "tui-e2e: cursor value (L3, pos 5 = 0.305 in metrics.csv) missing"; exit 1; }
if [ -n "${CAPTURE:-}" ]; then
    # Token labels appear once the worker has loaded the run's tokenizer (if the model is cached).
    for _ in $(seq 1 100); do screen | grep -q "^│tok " && break; sleep 0.1; done
    screen >"$CAPTURE"
fi
"${T[@]}" send-keys -t e2e '?'
wait_for "any key closes"
"${T[@]}" send-keys -t e2e Escape
sleep 0.3                                     # (Escape+q at once would read as Alt-q)
"${T[@]}" send-keys -t e2e q
wait_for "EXITED rc=0"
alt="$("${T[@]}" display-message -p -t e2e '#{alternate_on}')"
[ "$alt" = "0" ] || { echo "tui-e2e: still in the alternate screen after quit"; exit 1; }
echo "tui-e2e: ok"
