#!/usr/bin/env bash
# sbatch slurm/opsd_8b.sh [key=value ...]      the paper's Qwen3-8B OPSD recipe on 2 nodes of 8 GPUs
#
# What runs where (first OPSD_TRAIN_NODES nodes train, the rest serve rollouts):
#   node 1  the trainer: one torchrun, 8 ranks as TP 2 x DP 4
#   node 2  four SGLang servers of TP 2; the router beside them
# Weights reach the servers after every step (NCCL broadcast), checked by a probe; checkpoints
# every 10 steps in runs/<job name>; stop, checkpoint and requeue 10 minutes before the time limit.
# Logs: logs/<job name>-<job id>[-r<restart>]/; this script's output: logs/<job name>-<job id>.out.
# Check the plan anywhere: OPSD_DRY_RUN=1 SLURM_JOB_ID=1 SLURM_JOB_NODELIST='gpu[01-02]' bash slurm/opsd_8b.sh
#
# Resources: sbatch options override the lines below; OPSD_* settings: `opsd launch slurm --help`.
#SBATCH --job-name=opsd-8b
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:TERM@600
#SBATCH --requeue
##SBATCH --account=ACCOUNT --partition=PARTITION

export OPSD_CONFIG=${OPSD_CONFIG:-examples/qwen3_8b_paper.yaml}
export OPSD_TRAIN_NODES=${OPSD_TRAIN_NODES:-1}
export OPSD_GPUS_PER_NODE=${OPSD_GPUS_PER_NODE:-8}
export OPSD_TP=${OPSD_TP:-2} OPSD_PP=${OPSD_PP:-1}
export OPSD_SERVER_TP=${OPSD_SERVER_TP:-2}
export OPSD_FABRIC_PREFIX=${OPSD_FABRIC_PREFIX:-}
source "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/launch.sh"
