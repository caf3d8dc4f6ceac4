# Sourced by jobs/study.sh and jobs/sweep.sbatch: the runs of a sweep or study.
#
# A point names one training run, c<c>[-<split>][-s<seed>] (c0.2, c0.6-reference-s2), and
# is also its folder name. point_args POINT prints the --set overrides of that run, one
# argument per line: every client's cut ratio, the split mode and seed when given, and
# the opt-in that c = 0 (the server sees raw images) needs.
point_args() {
  local c="" field
  local IFS=-
  for field in $1; do
    case "$field" in
      c*) c=${field#c}; printf '%s\n' --set "clients.*.cut_ratio=$c" ;;
      s[0-9]*) printf '%s\n' --set "run.seed=${field#s}" ;;
      *) printf '%s\n' --set "diffusion.split=$field" ;;
    esac
  done
  if [ "$(awk -v c="$c" 'BEGIN { print (c == 0) }')" = 1 ]; then
    printf '%s\n' --set "clients.*.allow_centralized=true"
  fi
}
