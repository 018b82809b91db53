#!/bin/sh
# The waiter of a warm Hot Box (POSIX sh only, so it runs in any image, hotbox/shell included).
#
# A pooled box is created and started before anyone knows its command: this script is its first
# process. It says it is ready, then reads its job from stdin (the attach stream): a line holding N,
# then N lines of shell (export NAME='value' ... exec 'argv0' 'argv1' ...) that it evaluates. The
# job ends in exec, so the program replaces the waiter under tini and inherits the rest of stdin.
# `read` takes one byte at a time from a pipe, so nothing of that rest is consumed here.
printf 'hotbox-pool-ready\n'
IFS= read -r n || exit 0
job=
while [ "$n" -gt 0 ]; do
  IFS= read -r line || exit 0
  job="$job$line
"
  n=$((n - 1))
done
unset n line
eval "$job"
