#!/usr/bin/env bash
# Submits a luo-vmm explore campaign to Slurm: a job array of N shards
# (contrib/slurm/explore.sbatch) and a merge job that runs after every shard ended
# (contrib/slurm/merge.sbatch, --dependency=afterany). README.md "Campaigns".
#
#   contrib/slurm/submit.sh --shards N --campaign DIR [--parallel P] [--wait] -- EXPLORE-OPTIONS...
#
#   --shards N      the number of shards (array tasks 0..N-1)
#   --campaign DIR  where the shards (DIR/shard-I), their logs (DIR/logs) and the merged
#                   report (DIR/merged) go; on a file system every node sees
#   --parallel P    run at most P shards at once (the array's %P)
#   --wait          wait for the merge job and exit with its status (0 complete without
#                   findings, 6 findings, 7 a shard missing or incomplete)
# Other sbatch options come from sbatch's own environment variables (SBATCH_PARTITION,
# SBATCH_TIMELIMIT, SBATCH_ACCOUNT, ...). LUO_VMM names the luo-vmm binary (default:
# luo-vmm on PATH), XDG_CACHE_HOME the image cache; both are passed to the jobs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

usage() {
	sed -n '6,13p' "$0" >&2
	exit 2
}
shards= campaign= parallel= wait=0
while (($#)); do
	case $1 in
	--shards) shards=${2:-} && shift 2 ;;
	--campaign) campaign=${2:-} && shift 2 ;;
	--parallel) parallel=${2:-} && shift 2 ;;
	--wait) wait=1 && shift ;;
	--) shift && break ;;
	*) usage ;;
	esac
done
[[ $shards =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: --shards N (N >= 1) is required" >&2; exit 2; }
[[ -n $campaign ]] || { echo "submit.sh: --campaign DIR is required" >&2; exit 2; }
[[ -z $parallel || $parallel =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: --parallel P (P >= 1)" >&2; exit 2; }

LUO_VMM=$(command -v "${LUO_VMM:-luo-vmm}") || { echo "submit.sh: luo-vmm not found (set LUO_VMM)" >&2; exit 2; }
campaign=$(realpath -m "$campaign")
mkdir -p "$campaign/logs"
export LUO_VMM CAMPAIGN=$campaign SHARDS=$shards

array=$(sbatch --parsable --array="0-$((shards - 1))${parallel:+%$parallel}" \
	--output="$campaign/logs/shard-%a.out" "$here/explore.sbatch" "$@")
array=${array%%;*}
wait_opt=()
((wait)) && wait_opt=(--wait)
echo "submit.sh: shards: job array $array (0-$((shards - 1))${parallel:+, $parallel at a time}) -> $campaign/shard-I"
rc=0
merge=$(sbatch --parsable --dependency="afterany:$array" --output="$campaign/logs/merge.out" \
	"${wait_opt[@]}" "$here/merge.sbatch") || rc=$?
if ((wait)); then
	echo "submit.sh: merge ended (status $rc): $campaign/merged/report.txt"
	exit $rc
fi
echo "submit.sh: merge: job ${merge%%;*} (after every shard) -> $campaign/merged/report.{txt,json,html}"
