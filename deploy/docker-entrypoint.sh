#!/bin/sh
# Entrypoint of the kvtier images: turns Docker/Kubernetes secret files into the variables kvtier reads,
# then runs the command. For every variable NAME_FILE whose NAME starts with KVTIER_ (for example
# KVTIER_CONTROLLER_TOKEN_FILE=/run/secrets/kvtier_token), NAME is exported with the file's content
# (trailing newline removed) and NAME_FILE is removed: kvtier rejects KVTIER_* names that are not
# config keys, and a token never has to appear in the image, the compose file or a process's argv.
set -eu

for name in $(env | sed -n 's/^\(KVTIER_[A-Za-z0-9_]*\)_FILE=.*/\1/p'); do
    file=$(printenv "${name}_FILE")
    if [ ! -r "$file" ]; then
        echo "kvtier entrypoint: ${name}_FILE names $file, which is not a readable file" >&2
        exit 2
    fi
    value=$(cat "$file")
    export "$name=$value"
    unset "${name}_FILE"
done

exec "$@"
