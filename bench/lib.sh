# Shell helpers the bench scripts share (sourced, not run).

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# CPU pressure: PSI "some avg10" (0 when the kernel has no PSI).
psi() { awk '/^some/{split($2,a,"="); print a[2]}' /proc/pressure/cpu 2>/dev/null || echo 0; }

# Waits (up to a minute) for the machine to be quiet (PSI below 3) before
# measuring: figures taken under load from elsewhere are not comparable.
wait_quiet() {
  for _ in $(seq 1 30); do
    awk -v p="$(psi)" 'BEGIN{exit !(p < 3)}' && return
    sleep 2
  done
}
