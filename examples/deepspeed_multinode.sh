#!/bin/bash
# Multi-node ZeRO-3 started from ONE node with DeepSpeed's own launcher (pdsh over ssh) and a
# hostfile, through `accelerate launch` (--deepspeed_multinode_launcher pdsh --deepspeed_hostfile):
# accelerate turns the command into `deepspeed --hostfile <file> --launcher pdsh ...`, which logs
# into every host of the file and starts slots=<n> processes there. Needs pdsh and password-less
# ssh between the nodes, and the same repository path on all of them; accelerate writes the
# environment for the remote processes to ./.deepspeed_env. Under SLURM use
# examples/slurm_multinode.sh instead (srun, no ssh). See docs/multinode.md.
#   bash examples/deepspeed_multinode.sh                               # the hostfile beside this script
#   HOSTFILE=my_hosts bash examples/deepspeed_multinode.sh --config med2e3 --stage stage1_align ...
# Run it on the first host of the hostfile, from the repository root.
set -euo pipefail

HOSTFILE=${HOSTFILE:-examples/hostfile}
# The hosts and their slots, from the hostfile (comments and blank lines skipped).
HOSTS=$(grep -v '^[[:space:]]*\(#\|$\)' "$HOSTFILE")
NUM_MACHINES=$(echo "$HOSTS" | wc -l)
NUM_PROCESSES=$(echo "$HOSTS" | awk -F'slots=' '{n += $2} END {print n}')
MAIN_IP=$(echo "$HOSTS" | head -n 1 | awk '{print $1}')
if [ "$#" -eq 0 ]; then
    set -- --config med2e3 --stage stage2_finetune train.init_from=runs/stage1/final \
        train.output_dir=runs/stage2 train.mixed_precision=bf16 train.resume=auto
fi

accelerate launch --config_file configs/accelerate/multinode_zero3.yaml \
    --deepspeed_multinode_launcher pdsh --deepspeed_hostfile "$HOSTFILE" \
    --num_machines "$NUM_MACHINES" --num_processes "$NUM_PROCESSES" \
    --main_process_ip "$MAIN_IP" --main_process_port "${MAIN_PORT:-29500}" \
    -m medvlm3d.train "$@"
