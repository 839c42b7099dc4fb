# lime-server %postun: systemd forgets the removed unit; on upgrade the running
# service restarts on the new binary. /var/lib/lime-server and the user stay.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart lime-server.service >/dev/null 2>&1 || :
    fi
fi
exit 0
