# lime-server %pre: the service's system user (no purge on RPM systems: it stays,
# like the data directory, when the package is erased).
getent group lime-server >/dev/null || groupadd --system lime-server
getent passwd lime-server >/dev/null || \
    useradd --system --gid lime-server --home-dir /var/lib/lime-server --no-create-home \
        --shell /sbin/nologin --comment "LIME key server" lime-server
exit 0
