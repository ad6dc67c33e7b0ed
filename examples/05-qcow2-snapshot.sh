#!/usr/bin/env bash
# Block devices: create a qcow2 image with blockd-img, open it in blockd with --blockdev,
# take an external snapshot over QMP, look at the chain, then check the images with both
# blockd-img and qemu-img. Needs: npm run build, socat, qemu-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

"$here/../bin/blockd-img" create -f qcow2 "$work/base.qcow2" 64M
qemu-io -c 'write -P 0x42 0 1M' "$work/base.qcow2" >/dev/null     # some data written by QEMU

"$here/../bin/blockd" \
  --blockdev "driver=file,node-name=base-file,filename=$work/base.qcow2" \
  --blockdev qcow2,node-name=base,file=base-file \
  --object throttle-group,id=tg0,limits.bps-total=104857600 \
  --blockdev throttle,node-name=disk,throttle-group=tg0,file=base \
  --qmp "unix:$work/qmp.sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
for _ in $(seq 100); do [ -e "$work/blockd.pid" ] && break; sleep 0.05; done

# The overlay takes base's place under the throttle filter; base becomes its read-only backing file.
printf '%s\n' \
  '{"execute": "qmp_capabilities"}' \
  "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": {\"node-name\": \"base\", \"snapshot-file\": \"$work/overlay.qcow2\", \"snapshot-node-name\": \"overlay\"}}" \
  '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}' \
  '{"execute": "quit"}' | socat - "UNIX-CONNECT:$work/qmp.sock" | tr -d '\r' > "$work/replies"
wait
python3 - "$work/replies" <<'PY'
import json, sys
replies = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
nodes = replies[3]['return']
for node in nodes:
    print(f"{node['node-name']:12} {node['drv']:10} ro={node['ro']!s:5} {node['file']}")
overlay = next(n for n in nodes if n['node-name'] == 'overlay')
base = next(n for n in nodes if n['node-name'] == 'base')
assert overlay['backing_file'].endswith('base.qcow2') and base['ro'], 'overlay on top, base read-only'
PY

"$here/../bin/blockd-img" info --backing-chain "$work/overlay.qcow2" | grep -E '^(image|backing file):'
"$here/../bin/blockd-img" check "$work/overlay.qcow2"
qemu-img check -q "$work/overlay.qcow2" && qemu-img compare -q "$work/base.qcow2" "$work/overlay.qcow2" && echo "qemu-img agrees: chain intact, same contents"
