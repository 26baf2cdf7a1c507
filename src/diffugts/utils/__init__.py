"""Small helpers every part uses: atomic writes, devices, logs, progress, UIDs, metrics."""
