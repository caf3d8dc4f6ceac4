# Sourced by jobs/study.sh and jobs/sweep.sbatch: the runs of a sweep or study.
#
# A point names one training run, c<c>[-<split>][-<partition>][-shared][-s<seed>]
# (c0.2, c0.6-reference-s2, c0.2-markov-iid-shared-s1), or of the federated baseline
# fedavg[-small][-cond][-<partition>][-s<seed>] (run.method=federated; small: the clients'
# architecture, federated.architecture=client; cond: every client's model conditioned on its
# own labels, which stay local; each scores its global model beside the fine-tuned clients',
# eval.sets=[collaborative,global]), and is also its folder name.
# point_args POINT prints the --set overrides of that run, one argument per line: every
# client's cut ratio, the split mode and seed when given, the shards of the partition
# (STUDY_SHARDS with {partition} and {k} filled in, for k < STUDY_CLIENTS), labels sent
# to the server (shared: share_labels), the partition's own domain classifier (STUDY_CLASSIFIER
# with {partition} filled in, when set), and the opt-in that c = 0 (the server sees raw
# images) needs.
point_args() {
  local c="" field k shard
  local IFS=-
  for field in $1; do
    case "$field" in
      s[0-9]*) printf '%s\n' --set "run.seed=${field#s}" ;;
      iid|class|dirichlet)
        for ((k = 0; k < ${STUDY_CLIENTS:?the number of clients}; k++)); do
          shard=${STUDY_SHARDS:?the shard path pattern}
          shard=${shard//\{partition\}/$field}
          printf '%s\n' --set "clients.$k.shard=${shard//\{k\}/$k}"
        done
        if [ -n "${STUDY_CLASSIFIER:-}" ]; then
          printf '%s\n' --set "eval.classifier_path=${STUDY_CLASSIFIER//\{partition\}/$field}"
        fi ;;
      shared) printf '%s\n' --set "clients.*.share_labels=true" ;;
      fedavg)  # scores the global model beside the fine-tuned clients' (the collaborative set)
        printf '%s\n' --set run.method=federated --set "run.rounds=${FEDERATED_ROUNDS:?rounds of a federated point}"
        printf '%s\n' --set "eval.sets=[collaborative,global]" ;;
      small) printf '%s\n' --set federated.architecture=client ;;
      cond) printf '%s\n' --set "clients.*.labels=true" ;;
      c[0-9]*) c=${field#c}; printf '%s\n' --set "clients.*.cut_ratio=$c" ;;
      *) printf '%s\n' --set "diffusion.split=$field" ;;
    esac
  done
  if [ "$(awk -v c="$c" 'BEGIN { print (c == 0) }')" = 1 ]; then
    printf '%s\n' --set "clients.*.allow_centralized=true"
  fi
}
