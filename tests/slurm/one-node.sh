#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing luo-vmm's campaign scripts
# (contrib/slurm) against the real engine: munged, slurmctld and slurmd from Debian's
# packages (`apt-get install slurmctld slurmd slurm-client munge`), every file they use
# (munge key and socket, slurm.conf, state, spool, logs, pid files) in a temporary
# directory named by SLURM_CONF and explicit paths; nothing under /etc is read or changed.
# Every daemon is stopped on exit (also on failure or Ctrl-C), and the script checks that
# none is left.
#
#   tests/slurm/one-node.sh --smoke     start the cluster, run `sbatch --wrap hostname`, stop
#   tests/slurm/one-node.sh             the campaign test (README: "Campaigns"): a 2-shard
#                                       race campaign (--budget 8) on the reference kernel,
#                                       merged, against the same budget run as one process
#
# Run it as root (the daemons run as root with SlurmUser=root). Environment:
#   LUO_VMM          the luo-vmm binary (default: target/release/luo-vmm, built if missing)
#   KEEP=1           keep the temporary directory (logs) after the run
#   ONE_NODE_BUDGET  the search budget (default 8)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

smoke=0
case "${1:-}" in
--smoke) smoke=1 ;;
"") ;;
*)
	echo "usage: $0 [--smoke]" >&2
	exit 2
	;;
esac

die() {
	echo "one-node: FAIL: $*" >&2
	exit 1
}
say() { echo "one-node: $*"; }

((EUID == 0)) || die "run as root (the one-node cluster runs its daemons as root)"
for c in munged slurmctld slurmd sbatch squeue scancel sinfo jq flock ss; do
	command -v "$c" >/dev/null || die "$c not found (apt-get install slurmctld slurmd slurm-client munge jq)"
done

budget=${ONE_NODE_BUDGET:-8}
if ((!smoke)); then
	if [[ -z ${LUO_VMM:-} ]]; then
		cargo build --release -p luo-vmm
		LUO_VMM=$root/target/release/luo-vmm
	fi
	LUO_VMM=$(realpath "$LUO_VMM")
	export LUO_VMM
fi

T=$(mktemp -d /tmp/luo-slurm.XXXXXX)
chmod 700 "$T"
touch "$T/start"
mkdir -p "$T"/{munge,state,spool,log,run}
pids=()

stop_all() {
	local rc=$?
	set +e
	# Jobs first (so that no step outlives its slurmd), then the daemons we started.
	if [[ -n ${SLURM_CONF:-} ]] && [[ -f $T/run/slurmctld.pid ]]; then
		scancel --quiet --user=root >/dev/null 2>&1
		for _ in $(seq 60); do
			[[ -z $(squeue -h 2>/dev/null) ]] && break
			sleep 1
		done
	fi
	for pidfile in "$T"/run/slurmd.pid "$T"/run/slurmctld.pid "$T"/run/munged.pid; do
		[[ -f $pidfile ]] || continue
		local pid
		pid=$(cat "$pidfile")
		kill -TERM "$pid" 2>/dev/null
		for _ in $(seq 50); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.2
		done
		if kill -0 "$pid" 2>/dev/null; then
			echo "one-node: $pidfile ($pid) did not stop on TERM; killing it" >&2
			kill -KILL "$pid" 2>/dev/null
		fi
	done
	# Nothing of ours may be left: a process whose command line names our directory.
	local left
	left=$({
		pgrep -a -f -- "$T" || true
		pgrep -a -x slurmstepd || true
	} | grep -v pgrep || true)
	if [[ -n $left ]]; then
		echo "one-node: FAIL: left running:" >&2
		echo "$left" >&2
		rc=1
	else
		echo "one-node: every daemon stopped (no slurmstepd, nothing naming $T left)"
	fi
	# No system file changed: nothing under /etc or the packages' default state, spool,
	# log and run directories is newer than the start of the test.
	local changed
	changed=$(find /etc /var/lib/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm \
		/var/lib/munge /var/log/munge /run/munge -newer "$T/start" 2>/dev/null | head -20)
	if [[ -n $changed ]]; then
		echo "one-node: FAIL: system files changed during the test:" >&2
		echo "$changed" >&2
		rc=1
	else
		echo "one-node: no file under /etc or the packages' state, spool, log and run directories changed"
	fi
	if [[ ${KEEP:-0} == 1 || $rc != 0 ]]; then
		echo "one-node: logs kept in $T"
	else
		rm -rf "$T"
	fi
	exit $rc
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# munge: our own key and socket.
dd if=/dev/urandom of="$T/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$T/munge/munge.key"
munged --force --socket="$T/munge/munge.socket" --key-file="$T/munge/munge.key" \
	--pid-file="$T/run/munged.pid" --log-file="$T/log/munged.log" \
	--seed-file="$T/munge/munged.seed" ||
	die "munged did not start: $(tail -3 "$T/log/munged.log" 2>/dev/null)"
say "munged up (socket $T/munge/munge.socket)"

free_port() {
	local p
	for p in $(seq "$1" $(($1 + 200))); do
		ss -Hltn "sport = :$p" | grep -q . || {
			echo "$p"
			return
		}
	done
	die "no free TCP port from $1"
}
ctld_port=$(free_port 16817)
d_port=$(free_port $((ctld_port + 1)))
host=$(hostname -s)
cpus=$(nproc)
mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2))

export SLURM_CONF=$T/slurm.conf
cat >"$SLURM_CONF" <<CONF
ClusterName=luo-one-node
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$T/munge/munge.socket
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/run/slurmctld.pid
SlurmdPidFile=$T/run/slurmd.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=one Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld -i -f "$SLURM_CONF" || die "slurmctld did not start: $(tail -5 "$T/log/slurmctld.log")"
slurmd -f "$SLURM_CONF" || die "slurmd did not start: $(tail -5 "$T/log/slurmd.log")"
for _ in $(seq 60); do
	state=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
	[[ $state == idle* ]] && break
	sleep 1
done
[[ ${state:-} == idle* ]] || die "the node did not come up (sinfo: ${state:-nothing}); see $T/log"
say "slurmctld (port $ctld_port) and slurmd (port $d_port) up; node $host: $(sinfo -h -N -o '%t %c CPUs')"

# The smallest job first: the cluster itself works.
out=$(mktemp -p "$T")
sbatch --wait --quiet --output="$out" --wrap hostname >/dev/null || die "sbatch --wrap hostname failed: $(cat "$out")"
[[ $(cat "$out") == "$(hostname)" ]] || die "sbatch --wrap hostname printed $(cat "$out")"
say "sbatch --wrap hostname: $(cat "$out")"
((smoke)) && exit 0

# The campaign: 2 shards, one at a time (one guest at a time on this machine), merged by
# the dependent job; submit.sh --wait returns the merge's exit status.
say "campaign: 2 shards of explore --mode race --stage 1 --budget $budget on the reference kernel"
rc=0
contrib/slurm/submit.sh --shards 2 --parallel 1 --campaign "$T/campaign" --wait -- \
	--mode race --stage 1 --budget "$budget" || rc=$?
for f in "$T"/campaign/logs/*.out; do
	echo "--- $f (last lines)"
	tail -4 "$f"
done
((rc == 0 || rc == 6)) || die "the merge job ended with status $rc (7: a shard missing or incomplete)"
merged=$T/campaign/merged/report.json
[[ -f $merged ]] || die "no merged report"
[[ $(jq -r '.complete' "$merged") == true ]] || die "the merged campaign is incomplete: $(jq -c .missing "$merged")"
[[ $(jq -r '.shards_of' "$merged") == 2 ]] || die "the merged campaign is not of 2 shards"

# The same budget as one process, merged alone (to read it the same way).
say "the same budget as one process"
rc=0
"$LUO_VMM" explore --mode race --stage 1 --budget "$budget" --out "$T/single" >"$T/single.log" 2>&1 || rc=$?
((rc == 0 || rc == 6)) || die "explore as one process ended with status $rc: $(tail -3 "$T/single.log")"
rc=0
"$LUO_VMM" explore merge "$T/single" --out "$T/single-merged" >/dev/null || rc=$?
((rc == 0 || rc == 6)) || die "explore merge of the single run ended with status $rc"
single=$T/single-merged/report.json

# The check: the same findings (signatures and the trials that gave them) and the same
# search trials covered, in the same order.
sigs() { jq -c '[.findings[] | {oracle: .signature.oracle, site: .signature.site, cause: .signature.cause, trials}]' "$1"; }
trials() { jq -c '.coverage.trials' "$1"; }
[[ $(sigs "$merged") == "$(sigs "$single")" ]] ||
	die "findings differ: campaign $(sigs "$merged"), one process $(sigs "$single")"
[[ $(trials "$merged") == "$(trials "$single")" ]] ||
	die "trials covered differ: campaign $(trials "$merged"), one process $(trials "$single")"
say "campaign = one process: findings $(sigs "$merged"), $(jq '.coverage.trials | length' "$merged") search trials covered, the same ids in the same order"
sed 's/^/one-node:   /' "$T/campaign/merged/report.txt"
say "PASS"
