#!/usr/bin/env bash
# Runs every test binary of the workspace (built beforehand by `cargo test
# --no-run`), optionally several at once: most suites spend their time waiting on
# processes, timers and the control plane, not on the CPU, and they already
# share the components by namespace, keyspace and key prefix.
#
#   1. one at a time, while the machine is quiet, the suites whose source
#      says `//! kubechat-test: exclusive` (they stop a component the others
#      use, or measure pacing that other suites' load would distort). Nothing
#      runs beside them: the idle-period suites (discovery, quantities: 6-14 %
#      of the machine) did once, and a 1,000-client rollout drained too
#      slowly beside discovery's churn; both also use the Cassandra that an
#      exclusive suite stops (store_recovery);
#   2. the suites that share the components: KUBECHAT_TEST_JOBS at once
#      (default 3), longest first by the previous run's times. On two cores,
#      2 at once halved this phase (533 s -> 297 s); 3 once stretched timed
#      assertions (drains, leases) past their bounds, and passes since their
#      gateways run the release build and Cassandra stopped flushing on
#      every schema change (259 s at 2 -> 197 s at 3). What failed at 2 was
#      fixed at its cause: a quiet period measured before the pods were
#      placed, a 10 s bound on 14 creates (4 s each on a loaded apiserver), a
#      read of the whole shared push stream, and two product defects the load
#      exposed (a quota's refusal reported late, a push job dropped);
#   3. the doc tests.
#
# A suite's `//! kubechat-test: threads N` runs N of its tests at once
# (libtest's default is one per core): the exclusive suites' tests wait on
# timers, leases and drains far more than they use a core (the rollout
# suite: 139 s at 2, 62 s at 5, with release gateways; 47-50 s at 6 with
# its surge test split in two).
#
# Each binary runs from its package's directory, as `cargo test` runs it; its
# output is printed whole when it ends. Arguments go to every test binary
# (libtest's: a name filter, `--nocapture`, ...). Exits non-zero if any
# binary failed, listing which.
#
#   KUBECHAT_TEST_TIMES=1  each test's time in its result line (`ok <4.6s>`):
#                          libtest's `--report-time`, unstable, so it is
#                          enabled with RUSTC_BOOTSTRAP for the test binaries
#                          (not for Cargo: it would rebuild everything)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

jobs_at_once="${KUBECHAT_TEST_JOBS:-3}"
timed=()
[[ -n "${KUBECHAT_TEST_TIMES:-}" ]] && timed=(env RUSTC_BOOTSTRAP=1)
times_file="$KUBECHAT_CACHE/test-times.tsv"
out="$(mktemp -d "${TMPDIR:-/tmp}/kubechat-tests.XXXXXX")"
touch "$times_file" "$out/results"

# name, executable, package directory, lane (exclusive or shared), test
# threads (from `//! kubechat-test: threads N`; empty: libtest's default, one
# per core), one per line.
cargo test --workspace --locked --no-run --message-format=json 2>/dev/null | python3 -c '
import json, os, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable") or not msg["profile"]["test"]:
        continue
    target = msg["target"]
    package_dir = os.path.dirname(msg["manifest_path"])
    name = os.path.basename(package_dir) + "/" + target["name"]
    if target["kind"] != ["test"]:
        name += " (unit)"
    with open(target["src_path"], encoding="utf-8") as source:
        marks = [l.strip().removeprefix("//! kubechat-test:").strip() for l in source if l.startswith("//! kubechat-test:")]
    lane = "exclusive" if "exclusive" in marks else "shared"
    threads = next((m.split()[1] for m in marks if m.startswith("threads ")), "")
    print("\t".join([name, msg["executable"], package_dir, lane, threads]))
' >"$out/binaries"
[[ -s "$out/binaries" ]] || die "no test binaries: did \`cargo test --workspace --no-run\` succeed?"

# Each rebuild of a suite leaves its previous executable behind (200-400 MB
# each: the cached target dir grew past the disk). Keep only the current ones.
# A package's binary shares its test executable's prefix; cargo hard-links it
# to target/<profile>/<name>, so a second link marks it as in use.
while IFS=$'\t' read -r _ exe _ _; do
  prefix="${exe%-*}"
  for old in "$prefix"-????????????????; do
    if [[ -x "$old" && "$old" != "$exe" && "$(stat -c %h "$old")" == 1 ]] && ! grep -qF "$old" "$out/binaries"; then
      rm -f "$old" "$old.d"
    fi
  done
done <"$out/binaries"

# Longest first (a suite not timed yet counts as long: it starts early).
ordered() {
  local lane="$1"
  awk -F'\t' -v want="$lane" 'FILENAME == ARGV[1] { secs[$1] = $2; next }
    $4 == want { print ((($1 in secs) ? secs[$1] : 600) "\t" $0) }' "$times_file" "$out/binaries" |
    sort -t$'\t' -k1,1nr | cut -f2-
}

run_one() {
  local name="$1" exe="$2" dir="$3" threads="$4"
  shift 4
  local log="$out/$(printf '%s' "$name" | tr -c 'A-Za-z0-9_.-' '_').log"
  local started=$SECONDS code=0
  # As `cargo test` runs it: the binary may have been built in another clone,
  # so its sources are found through the runtime CARGO_MANIFEST_DIR.
  if ((${#timed[@]})); then set -- -Z unstable-options --report-time "$@"; fi
  (cd "$dir" && export CARGO_MANIFEST_DIR="$dir" && if [[ -n "$threads" ]]; then export RUST_TEST_THREADS="$threads"; fi &&
    "${timed[@]}" "$exe" "$@") >"$log" 2>&1 || code=$?
  local took=$((SECONDS - started))
  printf '%s\t%s\t%s\n' "$name" "$code" "$took" >>"$out/results"
  # One binary's output at a time, whole.
  {
    flock 9
    printf '\n---- %s (%s s, exit %s)\n' "$name" "$took" "$code"
    cat "$log"
  } 9>"$out/print.lock"
}

run_all() {
  local at_once="$1" lane="$2"
  shift 2
  local name exe dir threads
  while IFS=$'\t' read -r name exe dir _ threads; do
    while (($(jobs -rp | wc -l) >= at_once)); do wait -n || true; done
    run_one "$name" "$exe" "$dir" "$threads" "$@" &
  done < <(ordered "$lane")
  wait
}

# The machine's busy CPU time (every process: the components too), in
# hundredths of a second: how near the suite runs to the cores it has.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
busy_before=$(busy_ticks)
started=$SECONDS
run_all 1 exclusive "$@"
alone_done=$SECONDS
run_all "$jobs_at_once" shared "$@"
doc_code=0
cargo test --workspace --locked --doc -- "$@" >"$out/doc.log" 2>&1 || doc_code=$?
printf '\n---- doc tests (exit %s)\n' "$doc_code"
cat "$out/doc.log"

busy=$((($(busy_ticks) - busy_before) / 100))

# The times of this run order the next one (failed runs included: they took that long).
awk -F'\t' 'FILENAME == ARGV[1] { secs[$1] = $3; next } !($1 in secs) { print } END { for (n in secs) print n "\t" secs[n] }' \
  "$out/results" "$times_file" >"$out/times" && cp "$out/times" "$times_file"

# libtest's summary lines: `test result: ok. 12 passed; 0 failed; ...`.
read -r passed failed < <(cat "$out"/*.log | awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }')
echo
echo "==== $(wc -l <"$out/results") test binaries and the doc tests: $passed tests passed, $failed failed" \
  "($((alone_done - started)) s alone, then $((SECONDS - alone_done)) s with $jobs_at_once at once and doc tests)"
echo "==== CPU busy: $busy core-seconds in $((SECONDS - started)) s on $(nproc) cores" \
  "($((100 * busy / ((SECONDS - started) * $(nproc) + 1))) %)"
echo "==== slowest:" $(sort -t$'\t' -k3,3nr "$out/results" | head -5 | awk -F'\t' '{ printf "%s %s s; ", $1, $3 }')
bad=$(awk -F'\t' '$2 != 0 { print "  " $1 " (exit " $2 ")" }' "$out/results")
if [[ -n "$bad" || "$doc_code" != 0 ]]; then
  echo "==== FAILED:"
  [[ -n "$bad" ]] && echo "$bad"
  [[ "$doc_code" != 0 ]] && echo "  doc tests (exit $doc_code)"
  echo "==== logs in $out"
  exit 1
fi
rm -rf "$out"
