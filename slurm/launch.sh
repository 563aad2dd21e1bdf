# The one launcher of every slurm/opsd_*.sh: those set their defaults (OPSD_* variables) and source
# this file, which hands the job to `opsd launch slurm` (megatron_opsd/launch/, tested Python): it
# plans the job from SLURM's variables (roles, ports, srun lines, the training config), starts the
# router, servers and trainer as background job steps, waits for the fleet, and requeues the job
# when the trainer stopped on SIGTERM. OPSD_DRY_RUN=1 prints the plan and starts nothing.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"
export PYTHONUNBUFFERED=1 SLURM_UNBUFFEREDIO=1
# exec: the launcher itself receives the batch script's SIGTERM (--signal=B:TERM@N, preemption)
# shellcheck disable=SC2086  # OPSD_OVERRIDES is a list of key=value words
exec "${OPSD_PYTHON:-.venv/bin/python}" -m megatron_opsd.cli launch slurm "$OPSD_CONFIG" ${OPSD_OVERRIDES:-} "$@"
