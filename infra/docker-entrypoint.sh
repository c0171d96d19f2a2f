#!/bin/sh
# Container entrypoint for Sjaak.
#
#   docker run IMAGE                        -> python -m api serve --workers 2 (the image's CMD)
#   docker run IMAGE worker                 -> python -m api worker
#   docker run IMAGE migrate [--status]     -> python -m api migrate [--status]
#   docker run IMAGE python -m api tenants list
#
# A first argument that is an api subcommand (or an option) is passed to `python -m api`;
# anything else is executed as given.
#
# Without SJAAK_DATABASE_URL the service would start an embedded PostgreSQL inside the
# container, with its data in the container's writable layer. That is never wanted here, so
# it is an error. Only `openapi` and `--help`, which never touch a database, run without it.
set -eu

case "${1:-}" in
    serve | worker | migrate | tenants | openapi | -*)
        set -- python -m api "$@"
        ;;
esac

needs_database=1
if [ "$#" -ge 3 ] && [ "$1" = python ] && [ "$2" = -m ] && [ "$3" = api ]; then
    case "${4:-}" in
        openapi | -h | --help) needs_database=0 ;;
    esac
fi

if [ "$needs_database" = 1 ] && [ -z "${SJAAK_DATABASE_URL:-}" ]; then
    echo "sjaak: SJAAK_DATABASE_URL is not set." >&2
    echo "sjaak: refusing to start: in a container the service must use an external PostgreSQL" >&2
    echo "sjaak: (it would otherwise start an embedded one). Set it, e.g." >&2
    echo "sjaak:   -e SJAAK_DATABASE_URL=postgresql://user:password@db-host:5432/sjaak" >&2
    exit 78  # EX_CONFIG
fi

exec "$@"
