# Sourced by the CPU examples: environment and a run folder that never overwrites an earlier run.
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
# DeepSpeed's JIT-built ops cached in this checkout's environment (not shared with other environments,
# which would rebuild each other's op on every start; the run sets the same default when unset).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/torch_extensions}
# Exit status: 0 after a finished run, --exit-interval, or a stop signal handled with
# --exit-signal-handler on every rank; torchrun itself exits 1 after a SIGTERM it received too (its
# SignalException), although the ranks saved and exited 0: check "> exiting at iteration" or DIR/latest.

# run_dir DEFAULT: $RUN_DIR or DEFAULT; when it already holds a run, DEFAULT-<time> instead.
run_dir() {
    local dir=${RUN_DIR:-$1}
    if [ -e "$dir/latest" ]; then
        local new="$dir-$(date +%Y%m%d-%H%M%S)"
        echo "$dir holds an earlier run (kept); this one writes to $new" >&2
        dir=$new
    fi
    echo "$dir"
}
