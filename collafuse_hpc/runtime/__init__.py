"""Running a job: launch and rank map, the wire and its two transports, the role
loops, checkpoints, locks, signals and liveness."""
