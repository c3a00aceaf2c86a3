#!/usr/bin/env bash
# Submit a whole cohort to Slurm: one array task per participant, then the group level.
#
#   scripts/slurm/submit_cohort.sh BIDS_DIR OUTPUT_DIR [bids_postop options]
#
# 1. The participant list is taken from --participant-label L1 L2 ... among the options (removed from what
#    each task gets), else from $PARTICIPANTS_FILE, else from BIDS_DIR/participants.tsv. It is frozen into
#    <log dir>/participants_<time>.txt so that array indices keep their meaning if participants.tsv changes.
# 2. sbatch --array=1-N%K --parsable bids_postop_array.sbatch BIDS_DIR OUTPUT_DIR [options]
# 3. sbatch --dependency=afterany:<array job> ... (BIDS_POSTOP_LEVEL=group): the group level starts when every
#    task has ended, whether it succeeded or failed, and aggregates the participants that finished.
#
# Prints `array_job=<id>` and `group_job=<id>` on stdout (eval-able); messages go to stderr.
#
# Environment:
#   BIDS_POSTOP_MAX_PARALLEL   K, array tasks running at once (default 10)
#   SBATCH_ARGS                more sbatch options for the participant tasks, split on whitespace, e.g.
#                              "--partition=gpu --gres=gpu:1 --cpus-per-task=8 --mem=32G --time=01:00:00"
#   SBATCH_GROUP_ARGS          sbatch options for the group job (default: --cpus-per-task=1 --mem=2G
#                              --time=00:30:00)
#   BIDS_POSTOP_SLURM_LOGS     folder of the Slurm logs (default: ./slurm_logs)
#   BIDS_POSTOP_CMD, BIDS_POSTOP_SIF, BIDS_POSTOP_BIND, BIDS_POSTOP_WORK_DIR: see bids_postop_array.sbatch
#                              (exported to the jobs with the rest of the environment)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT=$HERE/bids_postop_array.sbatch
say() { echo "submit_cohort: $*" >&2; }

if (($# < 2)); then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 64
fi
BIDS_DIR=$(realpath -m -- "$1")
OUTPUT_DIR=$(realpath -m -- "$2")
shift 2
if [[ ! -d $BIDS_DIR ]]; then
    say "$BIDS_DIR: no such directory"
    exit 66
fi

# split --participant-label/--participant_label LABEL... out of the pass-through options
labels=()
passthrough=()
while (($#)); do
    case $1 in
        --participant-label | --participant_label)
            shift
            while (($#)) && [[ $1 != -* ]]; do labels+=("${1#sub-}"); shift; done
            ;;
        --participant-label=* | --participant_label=*)
            labels+=("${1#*=}"); labels[-1]=${labels[-1]#sub-}; shift
            ;;
        *)
            passthrough+=("$1"); shift
            ;;
    esac
done

LOG_DIR=$(realpath -m -- "${BIDS_POSTOP_SLURM_LOGS:-$PWD/slurm_logs}")
mkdir -p "$LOG_DIR"
LIST=$LOG_DIR/participants_$(date +%Y%m%d-%H%M%S)_$$.txt
if ((${#labels[@]})); then
    printf '%s\n' "${labels[@]}" >"$LIST"
else
    SOURCE=${PARTICIPANTS_FILE:-$BIDS_DIR/participants.tsv}
    if [[ ! -f $SOURCE ]]; then
        # no participants.tsv: every sub-* folder of the dataset
        find "$BIDS_DIR" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' -printf '%f\n' | sort >"$LIST"
    else
        awk -F'\t' '
            { sub(/\r$/, "", $1); gsub(/^[ \t]+|[ \t]+$/, "", $1) }
            NR == 1 && $1 == "participant_id" { next }
            $1 == "" || $1 ~ /^#/ { next }
            { sub(/^sub-/, "", $1); print $1 }' "$SOURCE" >"$LIST"
    fi
fi
N=$(grep -c . "$LIST" || true)
if ((N == 0)); then
    say "no participants to submit ($LIST is empty)"
    exit 66
fi
K=${BIDS_POSTOP_MAX_PARALLEL:-10}

read -r -a task_args <<<"${SBATCH_ARGS:-}"
read -r -a group_args <<<"${SBATCH_GROUP_ARGS:---cpus-per-task=1 --mem=2G --time=00:30:00}"

array_job=$(PARTICIPANTS_FILE=$LIST sbatch --parsable --array="1-$N%$K" \
    --output="$LOG_DIR/bids_postop_%A_%a.out" --export=ALL,PARTICIPANTS_FILE="$LIST" \
    "${task_args[@]}" "$SCRIPT" "$BIDS_DIR" "$OUTPUT_DIR" "${passthrough[@]}")
array_job=${array_job%%;*}
say "participant level: array job $array_job, $N tasks (at most $K at once), list $LIST"

group_job=$(sbatch --parsable --job-name=bids_postop_group --dependency="afterany:$array_job" \
    --kill-on-invalid-dep=no --output="$LOG_DIR/bids_postop_group_%j.out" \
    --export=ALL,BIDS_POSTOP_LEVEL=group "${group_args[@]}" \
    "$SCRIPT" "$BIDS_DIR" "$OUTPUT_DIR" "${passthrough[@]}")
group_job=${group_job%%;*}
say "group level: job $group_job after all of $array_job (afterany); logs in $LOG_DIR"
echo "array_job=$array_job"
echo "group_job=$group_job"
