#!/usr/bin/env bash
# QMP over stdin/stdout: pipe a script of commands into blockd (as with
# qemu-storage-daemon --chardev stdio). End the script with quit: EOF alone does not stop a daemon.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
replies="$(printf '%s\n' \
  '{"execute": "qmp_capabilities"}' \
  "{'execute': 'query-version', 'id': 'single quotes work too'}" \
  '{"execute": "no-such-command", "id": 2}' \
  '{"execute": "quit"}' |
  "$here/../bin/blockd" --chardev stdio,id=s --monitor s --log-level warn | tr -d '\r')"
echo "$replies"
echo "$replies" | grep -q '"class": "CommandNotFound", "desc": "The command no-such-command has not been found"'
