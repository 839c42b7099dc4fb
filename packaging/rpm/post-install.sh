# lime-server %post: the data directory (the SQLite databases and the self-signed
# certificate), the service's alone; systemd told of the unit. As usual on RPM
# systems the service is neither enabled nor started: `systemctl enable --now
# lime-server` once /etc/lime-server/lime-server.toml is as you want it.
install -d -o lime-server -g lime-server -m 0750 /var/lib/lime-server
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
