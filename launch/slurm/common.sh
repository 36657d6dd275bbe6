# shellcheck shell=bash
# Shared by the sbatch scripts in this folder: sourced (never run on its own) from inside a job.
#
# Knobs (environment variables; set them in your shell before `sbatch`, which exports them, or
# with `sbatch --export=ALL,NAME=value`). Unset ones get the defaults below.
#   BINDWEAVE_ROOT     the repository (default: the folder sbatch was run from)
#   BINDWEAVE_PYTHON   the Python to run (default: $BINDWEAVE_ROOT/.venv/bin/python, else python3)
#   BINDWEAVE_ARGS     Hydra overrides for the entry point, e.g. "model=bindweave_14b data.meta_path=..."
#   BINDWEAVE_OUTPUT   output_dir (default: outputs/slurm-$SLURM_JOB_ID: stays the same when the job is
#                      requeued, so a requeued job finds and skips its finished samples)
#   BINDWEAVE_LAUNCHER torchrun (one torchrun per node, c10d rendezvous on the first node) or
#                      srun (one process per Slurm task, no torchrun; give the job --ntasks-per-node)
#   BINDWEAVE_PROCS_PER_NODE  torchrun --nproc_per_node (default: the job's GPUs on the node
#                      (SLURM_GPUS_ON_NODE, 8 with the scripts' defaults), else 1 on a CPU-only job)
#   BINDWEAVE_RDZV_TIMEOUT    seconds torchrun waits for every node to join (default 900)
#   MASTER_ADDR / MASTER_PORT rendezvous address (default: the first node, a free port on it)
#   OMP_NUM_THREADS    CPU threads per process (default: CPUs of the task / processes per node)
#   NCCL_DEBUG (WARN), TORCH_NCCL_ASYNC_ERROR_HANDLING (1; NCCL_ASYNC_ERROR_HANDLING for old torch),
#   NCCL_NVLS_ENABLE (0: NVLink SHARP/multicast off, as our GPU hosts need), HF_HUB_OFFLINE (1:
#   compute nodes never download; fetch the weights first), TOKENIZERS_PARALLELISM (false).

bw_die() {
  echo "error: $*" >&2
  exit 2
}

bw_log() {
  echo "[bindweave-slurm $(date +%H:%M:%S)] $*" >&2
}

# Python, repository and working folder. Relative paths (outputs, caches, BINDWEAVE_ARGS) resolve
# against the job's working folder: the folder sbatch was run from, or sbatch --chdir.
bw_setup_python() {
  if [[ -z ${BINDWEAVE_PYTHON:-} ]]; then
    if [[ -x $BINDWEAVE_ROOT/.venv/bin/python ]]; then
      BINDWEAVE_PYTHON=$BINDWEAVE_ROOT/.venv/bin/python
    else
      BINDWEAVE_PYTHON=python3
    fi
  fi
  command -v "$BINDWEAVE_PYTHON" >/dev/null ||
    bw_die "BINDWEAVE_PYTHON=$BINDWEAVE_PYTHON is not an executable: set it to the Python of the bindweave environment"
  export BINDWEAVE_PYTHON BINDWEAVE_ROOT
  export PYTHONPATH="$BINDWEAVE_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

# Environment defaults; anything already set wins.
bw_setup_env() {
  local threads=${1:-1}
  export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-$TORCH_NCCL_ASYNC_ERROR_HANDLING}
  export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
}

# MASTER_ADDR = the first node of the job (the batch script runs there), MASTER_PORT = a port
# free on it now. Exported, so every srun task and torchrun sees them.
bw_setup_rendezvous() {
  if [[ -z ${MASTER_ADDR:-} ]]; then
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}" | head -n 1)
  fi
  if [[ -z ${MASTER_PORT:-} ]]; then
    MASTER_PORT=$("$BINDWEAVE_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
  fi
  export MASTER_ADDR MASTER_PORT
}

# Processes per node for torchrun: BINDWEAVE_PROCS_PER_NODE, else the GPUs Slurm gave the job on
# this node, else the GPUs nvidia-smi sees, else 1 (a CPU job).
bw_procs_per_node() {
  local gpus=${SLURM_GPUS_ON_NODE:-}
  if [[ -z $gpus && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
    gpus=${SLURM_GPUS_PER_NODE##*:}
  fi
  if [[ ! $gpus =~ ^[1-9][0-9]*$ ]] && command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  if [[ -n ${BINDWEAVE_PROCS_PER_NODE:-} ]]; then
    echo "$BINDWEAVE_PROCS_PER_NODE"
  elif [[ $gpus =~ ^[1-9][0-9]*$ ]]; then
    echo "$gpus"
  else
    echo 1
  fi
}

# Run ENTRY (a path relative to the repository) on every node/task of the job with the Hydra
# overrides: the default output folder first, then BINDWEAVE_ARGS (word-split: no spaces inside
# one override), then the script's arguments (sbatch SCRIPT ARGS...). Later overrides win.
# A script whose entry point keeps its files elsewhere sets BW_OUTPUT_SETTING (the setting that
# BINDWEAVE_OUTPUT fills: serve.state_dir for the server) and BW_OUTPUT_DEFAULT before calling it.
bw_launch() {
  local entry=$1
  shift
  local launcher=${BINDWEAVE_LAUNCHER:-torchrun}
  local output=${BINDWEAVE_OUTPUT:-${BW_OUTPUT_DEFAULT:-outputs/slurm-${SLURM_JOB_ID:-local}}}
  local setting=${BW_OUTPUT_SETTING:-output_dir}
  local -a overrides
  # shellcheck disable=SC2206 # BINDWEAVE_ARGS is a space-separated list of overrides by design
  overrides=("$setting=$output" ${BINDWEAVE_ARGS:-} "$@")
  [[ -f $BINDWEAVE_ROOT/$entry ]] ||
    bw_die "$BINDWEAVE_ROOT/$entry does not exist: submit from the repository root or set BINDWEAVE_ROOT"

  local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
  local -a srun_common=(--kill-on-bad-exit=1 --label)
  # Slurm 22.05 steps do not inherit the job's --cpus-per-task: pass it on.
  [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_common+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  bw_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}" \
         "($nodes node(s)); launcher $launcher; $setting=$output; cwd $PWD"
  # Each rank leaves its exit code and error in $BINDWEAVE_STATUS_FILE.<rank>
  # (bindweave/app/hydra_support.py finish): the launchers print their own summaries after the
  # ranks and torchrun exits 1 whatever the ranks' codes, so the job ends by repeating the error and
  # exiting with the real code.
  export BINDWEAVE_STATUS_FILE=$PWD/.bindweave-status-${SLURM_JOB_ID:-local}-${SLURM_RESTART_COUNT:-0}
  rm -f "$BINDWEAVE_STATUS_FILE".*
  local status=0

  case $launcher in
    torchrun)
      local procs
      procs=$(bw_procs_per_node)
      bw_setup_env "$(( cpus / procs > 0 ? cpus / procs : 1 ))"
      bw_setup_rendezvous
      bw_log "torchrun: $nodes x $procs processes, rendezvous $MASTER_ADDR:$MASTER_PORT"
      # One torchrun per node; they meet at the c10d store on the first node.
      srun "${srun_common[@]}" --ntasks="$nodes" --ntasks-per-node=1 \
        "$BINDWEAVE_PYTHON" -m torch.distributed.run \
        --nnodes="$nodes" --nproc-per-node="$procs" \
        --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
        --rdzv-id="${SLURM_JOB_ID:-bindweave}-${SLURM_RESTART_COUNT:-0}" \
        --rdzv-conf="join_timeout=${BINDWEAVE_RDZV_TIMEOUT:-900}" \
        --max-restarts=0 \
        "$BINDWEAVE_ROOT/$entry" "${overrides[@]}" || status=$?
      ;;
    srun)
      # One process per Slurm task: parallel/ reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.
      [[ -n ${SLURM_NTASKS:-} ]] ||
        bw_log "note: the job has no --ntasks/--ntasks-per-node, so srun starts one process per node"
      bw_setup_env "$cpus"
      bw_setup_rendezvous
      bw_log "srun: ${SLURM_NTASKS:-$nodes} processes, rendezvous $MASTER_ADDR:$MASTER_PORT"
      srun "${srun_common[@]}" "$BINDWEAVE_PYTHON" "$BINDWEAVE_ROOT/$entry" "${overrides[@]}" || status=$?
      ;;
    *)
      bw_die "BINDWEAVE_LAUNCHER=$launcher: use torchrun or srun"
      ;;
  esac
  bw_finish "$status"
}

# Exit with the lowest failing rank's own code, its error line last (see bw_launch). A rank that
# left no file (killed by torchrun after another rank failed, or by the OOM killer) says nothing;
# when no rank failed, the launcher's code stands, so a rank lost without a word still fails the job.
bw_finish() {
  local status=$1 file rank code message first_rank="" first_file=""
  for file in "$BINDWEAVE_STATUS_FILE".*; do
    [[ -f $file ]] || continue
    rank=${file##*.}
    code=$(head -n 1 "$file")
    if [[ $rank =~ ^[0-9]+$ && $code =~ ^[0-9]+$ && $code != 0 ]] &&
       [[ -z $first_rank || $rank -lt $first_rank ]]; then
      first_rank=$rank first_file=$file
    fi
  done
  if [[ -n $first_file ]]; then
    code=$(head -n 1 "$first_file")
    message=$(sed -n 2p "$first_file")
    rm -f "$BINDWEAVE_STATUS_FILE".*
    [[ -n $message ]] && echo "error: $message" >&2
    exit "$code"
  fi
  rm -f "$BINDWEAVE_STATUS_FILE".*
  exit "$status"
}
