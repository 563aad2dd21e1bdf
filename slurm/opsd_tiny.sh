#!/usr/bin/env bash
# sbatch slurm/opsd_tiny.sh [key=value ...]    the tiny CPU OPSD run as a two-node SLURM job
#
# What runs where:
#   node 1  the trainer: one torchrun of 2 ranks (TP 2) on CPUs, gloo
#   node 2  two `opsd serve` stand-ins for SGLang servers; the real sglang-router beside them
# examples/tiny_cpu_sglang.yaml's run (weights to the servers by disk after every step); the
# cluster's launch path end to end on CPUs: tests/test_slurm.py runs it on a real SLURM.
#SBATCH --job-name=opsd-tiny
#SBATCH --nodes=2
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:TERM@120
#SBATCH --requeue

export OPSD_CONFIG=${OPSD_CONFIG:-examples/tiny_cpu_sglang.yaml}
export OPSD_TRAIN_NODES=${OPSD_TRAIN_NODES:-1}
export OPSD_GPUS_PER_NODE=0 OPSD_PROCS_PER_NODE=${OPSD_PROCS_PER_NODE:-2}
export OPSD_TP=${OPSD_TP:-2}
export OPSD_SERVERS_PER_NODE=${OPSD_SERVERS_PER_NODE:-2}
export OPSD_FABRIC_PREFIX=${OPSD_FABRIC_PREFIX:-127.}   # the emulated nodes share this host's loopback
source "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/launch.sh"
