#!/bin/sh
# TEST-ONLY rsh agent for mpirun (tests/test_multinode.py): "HOST COMMAND..." runs COMMAND inside the network
# namespace that owns address HOST, as ssh would run it on that node (through a shell). Namespaces stand in for
# nodes on this machine; a real cluster uses ssh or its scheduler's agent.
host="$1"; shift
for ns in $(ip netns list | awk '{print $1}'); do
  if ip -n "$ns" -o addr show | grep -q " inet $host/"; then
    exec ip netns exec "$ns" /bin/sh -c "$*"
  fi
done
echo "netns_rsh: no network namespace has the address $host" >&2
exit 255
