#!/bin/bash
# Multi-node training under SLURM: one task per node; each task runs `accelerate launch`, which
# starts one process per GPU on its node (torchrun underneath, static rendezvous on the first node).
#   sbatch examples/slurm_multinode.sh                       # 2 nodes x 8 GPUs, ZeRO-3
#   sbatch --nodes 4 examples/slurm_multinode.sh             # 4 nodes
#   ACCEL=ddp sbatch examples/slurm_multinode.sh             # plain DDP (configs/accelerate/multinode_ddp.yaml)
#   sbatch examples/slurm_multinode.sh --config med2e3 --stage stage1_align train.output_dir=runs/stage1
# Submit from the repository root (the DeepSpeed json path in the accelerate yaml is relative to
# it); train.output_dir must be on a filesystem that every node sees. See docs/multinode.md.
#SBATCH --job-name=medvlm3d
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ACCEL=${ACCEL:-zero3}   # zero3 | ddp: configs/accelerate/multinode_<ACCEL>.yaml
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
if [ "$#" -eq 0 ]; then
    set -- --config med2e3 --stage stage2_finetune train.init_from=runs/stage1/final \
        train.output_dir=runs/stage2 train.mixed_precision=bf16 train.resume=auto
fi

# Single quotes: $SLURM_NODEID is expanded by each task on its own node, not here.
# "$@" is passed on as separate arguments after the script ($0 is "medvlm3d").
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
accelerate launch --config_file configs/accelerate/multinode_'"$ACCEL"'.yaml \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $((SLURM_NNODES * '"$GPUS_PER_NODE"')) \
    --main_process_ip '"$MAIN_IP"' --main_process_port '"$MAIN_PORT"' \
    -m medvlm3d.train "$@"' medvlm3d "$@"
