#!/usr/bin/env bash
# sbatch slurm/opsd_70b.sh [key=value ...]     OPSD of a Llama-3-70B-class model on 6 nodes of 8 GPUs
#
# What runs where (first OPSD_TRAIN_NODES nodes train, the rest serve rollouts):
#   nodes 1-4  the trainer: one torchrun per node, 8 ranks each = 32 ranks as TP 8 x PP 4 (x DP 1)
#   nodes 5-6  one SGLang server of TP 8 per node; the router on node 5
# The trainer syncs its weights to the servers after every step (NCCL broadcast per pipeline
# stage), checks them with a probe, and checkpoints to runs/<job name> every 5 steps.
# 10 minutes before the time limit (or on preemption) the trainer stops at its next phase
# boundary, writes a checkpoint, and the job is requeued; the requeued job resumes from it.
# Logs: logs/<job name>-<job id>[-r<restart>]/ (plan.json, config.yaml, trainer-N.log,
# server-N.log, router.log); this script's own output: logs/<job name>-<job id>.out.
# Check the plan anywhere: OPSD_DRY_RUN=1 SLURM_JOB_ID=1 SLURM_JOB_NODELIST='gpu[001-006]' bash slurm/opsd_70b.sh
#
# Every resource below is overridable on the command line (sbatch --nodes=10 --time=08:00:00 ...),
# every OPSD_* setting by the environment (OPSD_TRAIN_NODES=8 sbatch ...): `opsd launch slurm --help`.
#SBATCH --job-name=opsd-70b
#SBATCH --nodes=6
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:TERM@600
#SBATCH --requeue
##SBATCH --account=ACCOUNT --partition=PARTITION

export OPSD_CONFIG=${OPSD_CONFIG:-examples/llama3_70b.yaml}
export OPSD_TRAIN_NODES=${OPSD_TRAIN_NODES:-4}
export OPSD_GPUS_PER_NODE=${OPSD_GPUS_PER_NODE:-8}
export OPSD_TP=${OPSD_TP:-8} OPSD_PP=${OPSD_PP:-4}
export OPSD_SERVER_TP=${OPSD_SERVER_TP:-8}
export OPSD_FABRIC_PREFIX=${OPSD_FABRIC_PREFIX:-}    # e.g. 10. : the address prefix of the nodes' fabric
source "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/launch.sh"
