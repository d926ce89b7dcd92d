# Sourced by the evaluation scripts: each task's scoring protocol, fixed before any expert was trained
# (issue 15's rules of evidence). ARC is scored by the likelihood of its options (a 135M model rarely
# writes a letter it means); every other task by generating its answer and verifying it.
task_mode() {
  case $1 in
    arc_easy | arc_challenge) echo loglik ;;
    *) echo generate ;;
  esac
}
