# Shared by tests/vm/*.sh (sourced).

# A free TCP port on 127.0.0.1 for qemu's hostfwd.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# subscribe_while_running PID PORT FILE SECONDS: append every `edgesight/#` message
# (`topic payload` lines) from the broker behind 127.0.0.1:PORT to FILE until process PID
# (the VM) exits or SECONDS pass. Until the broker in the VM answers, qemu's port forward
# accepts and closes at once: keep reconnecting.
subscribe_while_running() {
    local vm=$1 port=$2 file=$3 limit=$4 t0 sub
    t0=$(date +%s)
    while kill -0 "$vm" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do
        mosquitto_sub -h 127.0.0.1 -p "$port" -t 'edgesight/#' -T 'edgesight/+/+/snapshot' -v \
            >> "$file" 2>/dev/null &
        sub=$!
        while kill -0 $sub 2>/dev/null && kill -0 "$vm" 2>/dev/null; do sleep 1; done
        kill $sub 2>/dev/null || true
        wait $sub 2>/dev/null || true
        sleep 1
    done
}
