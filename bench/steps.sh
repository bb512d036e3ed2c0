# Sourced by the GPU scripts in bench/: step NAME SECONDS COMMAND... runs COMMAND under a time limit,
# its output to the screen and to $OUT/NAME.txt (the data loader's checksum warning dropped), and
# adds NAME to the array `failed` when it exits non-zero.
failed=()

step() {
    local name=$1 limit=$2 started=$SECONDS code
    shift 2
    echo "== $name (limit $limit s)"
    timeout "$limit" "$@" 2>&1 | grep --line-buffered -v 'differs from the official archive\|return _load_cifar' | tee "$OUT/$name.txt"
    code=${PIPESTATUS[0]}
    echo "== $name: exit $code after $((SECONDS - started)) s" | tee -a "$OUT/$name.txt"
    [ "$code" = 0 ] || failed+=("$name")
}

finish() {  # the summary line; exit 1 if any step failed
    if [ ${#failed[@]} -gt 0 ]; then
        echo "failed: ${failed[*]}"
        exit 1
    fi
    echo "all steps passed"
}
