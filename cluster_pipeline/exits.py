"""The exit statuses of a rank, the CLI and the launchers, in one place that imports nothing:
launch.local reads them before it starts its ranks, and importing torch first would delay them.
"""

# Bad input: a config key, a shard or sample, a run directory in use (one line names it).
EXIT_BAD_INPUT = 2
# A rank stops because another rank is lost (EX_UNAVAILABLE).
EXIT_RANK_LOST = 69
# Stopped by a signal after writing its checkpoint: run the same command to continue
# (EX_TEMPFAIL).
EXIT_STOPPED = 75
# Aborted by a second Ctrl-C, without a checkpoint (as a shell reports SIGINT: 128 + 2).
EXIT_ABORTED = 130
