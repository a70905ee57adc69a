#!/usr/bin/env bash
# Pick the launcher for a minimind_scale run and print the exact command before running it.
#
#   ./launch.sh demo
#   ./launch.sh STAGE [--gpus N | --cpu N] [--nodes M --node_rank R --master_addr A --master_port P]
#                     [--zero 0|1|2|3] [--offload] [--dry_run] [--] [stage options ...]
#
# No --zero: one process runs as `python -m minimind_scale`, several through `accelerate launch`
# (DDP on GPUs, gloo on CPUs). --zero K: the `deepspeed` launcher with ds_configs/zeroK.json
# (--offload: ds_configs/zero3_offload.json). Any option not listed above goes to the stage.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"

if [ $# -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0
fi
stage="$1"; shift
if [ "$stage" = "demo" ]; then
  echo "+ $PY -m minimind_scale demo $*"; exec "$PY" -m minimind_scale demo "$@"
fi

procs=""; cpu=0; nodes=1; node_rank=0; master_addr=127.0.0.1; master_port=29500; zero=""; offload=0; dry=0
extra=()
need() { [ $# -ge 2 ] || { echo "launch.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) need "$@"; procs="$2"; shift 2 ;;
    --cpu) need "$@"; procs="$2"; cpu=1; shift 2 ;;
    --nodes) need "$@"; nodes="$2"; shift 2 ;;
    --node_rank) need "$@"; node_rank="$2"; shift 2 ;;
    --master_addr) need "$@"; master_addr="$2"; shift 2 ;;
    --master_port) need "$@"; master_port="$2"; shift 2 ;;
    --zero) need "$@"; zero="$2"; shift 2 ;;
    --offload) offload=1; shift ;;
    --dry_run) dry=1; shift ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done

if [ -z "$procs" ]; then
  if [ "$cpu" = 0 ] && command -v nvidia-smi >/dev/null 2>&1; then procs=$(nvidia-smi -L | wc -l); fi
  [ -n "$procs" ] && [ "$procs" -gt 0 ] || procs=1
fi
case "$zero" in ""|0|1|2|3) ;; *) echo "launch.sh: --zero must be 0, 1, 2 or 3" >&2; exit 2 ;; esac
if [ "$offload" = 1 ]; then
  [ "$zero" = 3 ] || { echo "launch.sh: --offload needs --zero 3" >&2; exit 2; }
  ds_config="$HERE/ds_configs/zero3_offload.json"
elif [ -n "$zero" ]; then
  ds_config="$HERE/ds_configs/zero$zero.json"
fi

if [ -n "$zero" ]; then
  # --num_gpus also sets the CPU process count when no GPU is present (DS_ACCELERATOR=cpu).
  [ "$cpu" = 1 ] && export DS_ACCELERATOR=cpu
  cmd=(deepspeed --num_gpus "$procs")
  if [ "$nodes" -gt 1 ]; then
    cmd+=(--num_nodes "$nodes" --node_rank "$node_rank" --master_addr "$master_addr" --master_port "$master_port" --no_ssh)
  else
    cmd+=(--master_port "$master_port")
  fi
  cmd+=(--module minimind_scale "$stage" --deepspeed "$ds_config")
elif [ "$procs" -eq 1 ] && [ "$nodes" -eq 1 ]; then
  cmd=("$PY" -m minimind_scale "$stage")
else
  # --multi_gpu on a GPU-less machine still starts N processes; minimind_scale joins them with gloo.
  cmd=(accelerate launch --multi_gpu --num_processes $((procs * nodes)) --num_machines "$nodes"
       --machine_rank "$node_rank" --main_process_ip "$master_addr" --main_process_port "$master_port"
       --mixed_precision no --dynamo_backend no -m minimind_scale "$stage")
fi
cmd+=("${extra[@]}")
printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
[ "$dry" = 1 ] && exit 0
exec "${cmd[@]}"
