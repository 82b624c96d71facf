# Sourced by the CPU examples: environment and a run folder that never overwrites an earlier run.
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1

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
